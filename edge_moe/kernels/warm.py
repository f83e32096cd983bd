"""The cpu kernels' first compile, done once per machine in a child process: LLVM's memory (measured
+174 MB on 2 cores, +273 MB on 16) must not land in a process that has promised a memory budget."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from edge_moe.kernels import attention, bookkeeping, cpu

ENTRY_POINTS = (cpu._matmul_kernel, cpu._ffn_kernel, cpu._byte_matmul_kernel,  # what the runtime calls
                cpu._nibble_matmul_kernel, cpu._unit_addresses, attention.decode_attention, attention.rms_rows,
                attention.route_token, attention.add_rms_rows, bookkeeping.assign_bits, bookkeeping.claim,
                bookkeeping.fold_routing, bookkeeping.unpin, bookkeeping.count,
                bookkeeping.wanted_form, *((cpu._to_nibbles, cpu._lut_transpose) if cpu.STRIDED else ()))
CHILD = ("import sys; sys.path.insert(0, {root!r}); "
         "from edge_moe.kernels.warm import call_every_kernel; call_every_kernel()")


def call_every_kernel() -> None:
    """Call each entry point once on a tiny expert: compiles it, or loads it from numba's cache.
    One signature each serves every scheme, width and token count (those are runtime arguments)."""
    from edge_moe.format.layout import build_layout, pack_expert, to_units
    from edge_moe.format.nested import quantize

    rng = np.random.default_rng(0)
    weights = {"gate_up": rng.standard_normal((256, 128)), "down": rng.standard_normal((128, 128))}
    layout = build_layout({k: v.shape for k, v in weights.items()}, "msb", 128)
    packed = pack_expert(layout, {k: quantize(v, "msb", 128) for k, v in weights.items()})
    buf = np.frombuffer(packed, np.uint8).copy()  # writable, as the runtime's buffers are (a numba type)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    cpu.nested_matmul(layout, buf, "down", x, 4)
    cpu.expert_ffn(layout, buf, x, 4)
    cpu.moe_ffn_units(layout, to_units(layout, buf), np.arange(8)[None], np.array([4]), x,  # the runtime's call
                      np.array([0, 1]), np.zeros(1, np.int64), np.ones(1, np.float32))
    heads, cache = np.ones((2, 8), np.float32), np.zeros((4, 1, 8), np.float32)  # decode attention
    attention.decode_attention(heads, heads[:1].copy(), heads[:1].copy(), heads[0], heads[0], 1,
                               np.float32(1e-6), heads[0], heads[0], cache, cache.copy(), 0,
                               np.empty_like(heads))
    attention.rms_rows(heads, heads[0], np.float32(1e-6), np.empty_like(heads))
    attention.add_rms_rows(heads, heads.copy(), heads[0], np.float32(1e-6), np.empty_like(heads))
    attention.route_token(heads[0], heads, True, np.empty(1, np.float32), np.empty(1, np.int64))
    _call_bookkeeping()
    scale, minimum = np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32)
    cpu.byte_matmul(np.zeros((8, 128), np.uint8), scale, minimum, x)  # the dense part at 8 bits (ByteLinear)
    cpu.nibble_matmul(np.zeros((8, 64), np.uint8), scale, minimum, x)  # and at 4 (NibbleLinear)
    if cpu.nibble_form(layout):  # resident experts rewritten, on AVX2 (ExpertCache.rewrite)
        arena = to_units(layout, buf)
        cpu.rewrite_form(layout, arena, np.arange(8), cpu.PLANE_FORM, cpu.LUT_FORM)
        cpu.rewrite_form(layout, arena, np.arange(8), cpu.LUT_FORM, cpu.NIBBLE_FORM)


def _call_bookkeeping() -> None:
    """The decode step's bookkeeping (runtime: BitRequest.assign, ExpertCache.claim_resident, MoePipeline,
    RunStats) on a row of 4 experts, with the runtime's dtypes."""
    experts, bits, counter = np.array([2, 0]), np.array([4, 3]), np.zeros(9, np.int64)
    bookkeeping.assign_bits(np.array([[0.7, 0.3]]), 0.5, 3, 4)
    held, pins, last_used = np.full(4, 8), np.zeros(4, np.int64), np.zeros(4, np.int64)
    forms, units = np.zeros(4, np.int8), np.zeros((4, 8), np.int64)
    bookkeeping.claim(held, pins, np.zeros(4), last_used, 1, 0.5, forms, units, experts, bits, 3, 4, True,
                      np.empty((2, 8), np.int64), np.empty(2, np.int8))
    bookkeeping.wanted_form(2, 0, 3, 4, True)  # MoePipeline._wanted
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
        print("edge-moe: compiling the cpu kernels for this machine (once, 30-90 s)", file=sys.stderr,
              flush=True)
        # the child must compile these very files, whatever its working directory holds (a source
        # tree there shadowed an installed package and the child filled the wrong cache)
        root = str(Path(cpu.__file__).resolve().parents[2])
        child = subprocess.run([sys.executable, "-c", CHILD.format(root=root)], capture_output=True, text=True)
        if child.returncode != 0 or not compiled():
            why = (f"exit {child.returncode}: {child.stderr.strip()[-300:]}" if child.returncode
                   else "is numba's cache directory writable?")
            warnings.warn(f"edge-moe: the cpu kernels could not be compiled into numba's cache ({why}); they "
                          "compile in this process, whose RSS may pass --memory-budget by ~200 MB",
                          RuntimeWarning, stacklevel=2)
    call_every_kernel()
    _loaded = True
