"""The cpu kernels' numba entry points by group and one call of each on tiny inputs (kernels.cpu.warmup),
under the name runtime.warm imports them by."""

from edge_moe.kernels.cpu.warmup import ENTRY_POINTS, GROUPS, call_every_kernel, call_group, groups_for

__all__ = ["ENTRY_POINTS", "GROUPS", "call_every_kernel", "call_group", "groups_for"]
