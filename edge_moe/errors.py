"""Typed errors a user can cause; each message names the file, tensor or flag and what to change."""


class EdgeMoeError(Exception):
    """Base of every error edge-moe raises on bad input."""


class UnsupportedArchitecture(EdgeMoeError):
    """The checkpoint's model_type has no adapter."""


class CheckpointError(EdgeMoeError):
    """A source checkpoint is missing a tensor, or a tensor has the wrong shape or dtype."""


class FormatError(EdgeMoeError):
    """An .emoe file is corrupt, truncated, or of an unknown version."""


class BudgetError(EdgeMoeError):
    """A memory budget is too small for the model."""


class UsageError(EdgeMoeError):
    """A flag or argument has a bad value."""


class BudgetWarning(UserWarning):
    """The memory budget made the runtime do less than asked (narrower experts)."""


class BusyError(EdgeMoeError):
    """Every batch slot and queue place is taken; the request may be tried again later."""
