"""The kernels' first compile, done once per machine in a child process: LLVM's memory (170-270 MB,
which numba keeps) must not land in a process that has promised a memory budget."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from edge_moe.kernels import warm as kernels_warm
from edge_moe.runtime import bookkeeping

ENTRY_POINTS = (*kernels_warm.ENTRY_POINTS, bookkeeping.assign_bits, bookkeeping.acquire_row,
                bookkeeping.fold_routing, bookkeeping.unpin, bookkeeping.count)
CHILD = ("import sys; sys.path.insert(0, {root!r}); "
         "from edge_moe.runtime.warm import call_every_kernel; call_every_kernel()")


def call_every_kernel() -> None:
    """Call each entry point once: compiles it, or loads it from numba's cache."""
    kernels_warm.call_every_kernel()
    _call_bookkeeping()


def _call_bookkeeping() -> None:
    """The decode step's bookkeeping (BitRequest.assign, ExpertCache.acquire and release, RunStats) on a
    row of 4 experts, with the runtime's dtypes."""
    experts, bits, counter = np.array([2, 0]), np.array([4, 3]), np.zeros(9, np.int64)
    bookkeeping.assign_bits(np.array([[0.7, 0.3]]), 0.5, 3, 4)
    held, pins, last_used = np.full(4, 8), np.zeros(4, np.int64), np.zeros(4, np.int64)
    forms, units = np.zeros(4, np.int8), np.zeros((4, 8), np.int64)
    table = np.zeros((1, 9, 9), np.int8)
    bookkeeping.acquire_row(held, pins, np.zeros(4), last_used, 1, 0.5, forms, units, table, experts,
                            np.ones(2, np.int64), bits, np.empty((2, 8), np.int64), np.empty(2, np.int8),
                            np.empty(2, np.int64))
    bookkeeping.fold_routing(np.zeros(4), last_used, np.ones(4, np.int64), 2, 0.5)  # record_routing
    bookkeeping.unpin(pins, experts)
    bookkeeping.count(bits, counter, counter.copy())


def _on_disk(dispatcher) -> bool:
    """numba's cache holds this function, for this machine and this source (numba internals; any
    change there reads as 'not cached', which only costs a child process)."""
    try:
        cache, codegen = dispatcher._cache, dispatcher.targetctx.codegen()
        index = cache._cache_file._load_index()
        return any(cache._index_key(key[0], codegen) == key for key in index)
    except Exception:  # noqa: BLE001 - a missing or unreadable cache is simply not a cache
        return False


def compiled() -> bool:
    return all(_on_disk(d) for d in ENTRY_POINTS)


_loaded = False  # this process has called every kernel once


def prepare() -> None:
    """Make the kernels ready before a budgeted process measures its baseline: compile them in a
    child process if numba's cache lacks them, then load them here (~0.2 s, their code and threads
    then count in the baseline). Once per process."""
    global _loaded
    if _loaded:
        return
    if not compiled():
        print("edge-moe: compiling the cpu kernels for this machine (once, a few minutes)", file=sys.stderr,
              flush=True)
        # the child must compile these very files, whatever its working directory holds (a source
        # tree there shadowed an installed package and the child filled the wrong cache)
        root = str(Path(__file__).resolve().parents[2])
        child = subprocess.run([sys.executable, "-c", CHILD.format(root=root)], capture_output=True, text=True)
        if child.returncode != 0 or not compiled():
            why = (f"exit {child.returncode}: {child.stderr.strip()[-300:]}" if child.returncode
                   else "is numba's cache directory writable?")
            warnings.warn(f"edge-moe: the cpu kernels could not be compiled into numba's cache ({why}); they "
                          "compile in this process, whose RSS may pass --memory-budget by ~200 MB",
                          RuntimeWarning, stacklevel=2)
    call_every_kernel()
    _loaded = True
