"""The cpu kernels' numba entry points (with the decoder's small ops), and one call of each on tiny inputs."""

from __future__ import annotations

import numpy as np

from edge_moe.format.layout import build_layout, pack_expert, to_units
from edge_moe.format.nested import quantize
from edge_moe.kernels import attention
from edge_moe.kernels.cpu.constants import LUT_FORM, NIBBLE_FORM, PLANE_FORM
from edge_moe.kernels.cpu.dense import _byte_matmul_kernel, _nibble_matmul_kernel
from edge_moe.kernels.cpu.entry import _ffn_kernel, _matmul_kernel
from edge_moe.kernels.cpu.forms import _lut_transpose, _to_nibbles, rewrite_form
from edge_moe.kernels.cpu.ops import (
    _unit_addresses,
    byte_matmul,
    expert_ffn,
    moe_ffn_units,
    nested_matmul,
    nibble_matmul,
)
from edge_moe.kernels.cpu.plan import nibble_form
from edge_moe.kernels.cpu.simd.isa import STRIDED

# the numba functions the runtime calls (what a warm-up must find in numba's cache)
ENTRY_POINTS = (_matmul_kernel, _ffn_kernel, _byte_matmul_kernel, _nibble_matmul_kernel, _unit_addresses,
                attention.decode_attention, attention.rms_rows, attention.route_token, attention.add_rms_rows,
                *((_to_nibbles, _lut_transpose) if STRIDED else ()))


def call_every_kernel() -> None:
    """Call each entry point once on a tiny expert: compiles it, or loads it from numba's cache.
    One signature each serves every scheme, width and token count (those are runtime arguments)."""
    rng = np.random.default_rng(0)
    weights = {"gate_up": rng.standard_normal((256, 128)), "down": rng.standard_normal((128, 128))}
    layout = build_layout({k: v.shape for k, v in weights.items()}, "msb", 128)
    packed = pack_expert(layout, {k: quantize(v, "msb", 128) for k, v in weights.items()})
    buf = np.frombuffer(packed, np.uint8).copy()  # writable, as the runtime's buffers are (a numba type)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    nested_matmul(layout, buf, "down", x, 4)
    expert_ffn(layout, buf, x, 4)
    moe_ffn_units(layout, to_units(layout, buf), np.arange(8)[None], np.array([4]), x,  # the runtime's call
                  np.array([0, 1]), np.zeros(1, np.int64), np.ones(1, np.float32))
    heads, cache = np.ones((2, 8), np.float32), np.zeros((4, 1, 8), np.float32)  # decode attention
    attention.decode_attention(heads, heads[:1].copy(), heads[:1].copy(), heads[0], heads[0], 1,
                               np.float32(1e-6), heads[0], heads[0], cache, cache.copy(), 0,
                               np.empty_like(heads))
    attention.rms_rows(heads, heads[0], np.float32(1e-6), np.empty_like(heads))
    attention.add_rms_rows(heads, heads.copy(), heads[0], np.float32(1e-6), np.empty_like(heads))
    attention.route_token(heads[0], heads, True, np.empty(1, np.float32), np.empty(1, np.int64))
    scale, minimum = np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32)
    byte_matmul(np.zeros((8, 128), np.uint8), scale, minimum, x)  # the dense part at 8 bits (ByteLinear)
    nibble_matmul(np.zeros((8, 64), np.uint8), scale, minimum, x)  # and at 4 (NibbleLinear)
    if nibble_form(layout):  # resident experts rewritten, on AVX2 (resident_forms)
        arena = to_units(layout, buf)
        rewrite_form(layout, arena, np.arange(8), PLANE_FORM, LUT_FORM)
        rewrite_form(layout, arena, np.arange(8), LUT_FORM, NIBBLE_FORM)
