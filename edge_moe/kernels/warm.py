"""The cpu kernels' numba entry points and one call of each on tiny inputs (kernels.cpu.warmup), under the
name runtime.warm imports them by."""

from edge_moe.kernels.cpu.warmup import ENTRY_POINTS, call_every_kernel

__all__ = ["ENTRY_POINTS", "call_every_kernel"]
