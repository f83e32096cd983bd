"""edge-moe: run Mixture-of-Experts language models on devices with little memory."""

__version__ = "0.1.0"


def load(model=None, memory_budget=None, device="cpu", **kwargs):
    """Load an .emoe model (the shipped demo model when `model` is None); see edge_moe.api.Model."""
    from edge_moe.api import load as _load

    return _load(model, memory_budget=memory_budget, device=device, **kwargs)
