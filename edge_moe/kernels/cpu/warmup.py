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

# the numba entry points by the part of the runtime that calls them: a process compiles (or loads from
# numba's cache) only the parts its model and options use
GROUPS = {
    "experts": (_ffn_kernel, _unit_addresses),  # moe_ffn_units: every MoE layer
    "dense8": (_byte_matmul_kernel,),  # the packed dense part at 8 bits (ByteLinear)
    "dense4": (_nibble_matmul_kernel,),  # and at 4 (NibbleLinear)
    "nested": (_matmul_kernel,),  # one nested matrix: the dense part at 5-7 bits (PackedLinear), tools
    "forms": (_to_nibbles, _lut_transpose) if STRIDED else (),  # resident experts rewritten, on AVX2
    "attention": (attention.decode_attention, attention.prefill_attention, attention.rms_rows,
                  attention.route_token, attention.route_rows, attention.add_rms_rows),
}
ENTRY_POINTS = tuple(f for group in GROUPS.values() for f in group)


def groups_for(dense_bits: int, resident_forms: bool) -> tuple[str, ...]:
    """The groups a model on the cpu backend calls, with its dense width (16: unpacked) and forms."""
    dense = {8: ("dense8",), 4: ("dense4",), 16: ()}.get(dense_bits, ("nested",))
    return ("attention", "experts", *dense, *(("forms",) if resident_forms and STRIDED else ()))


def _tiny_expert():
    """A packed 2-matrix expert on tiny shapes (layout, writable buffer as the runtime's) and an input row."""
    rng = np.random.default_rng(0)
    weights = {"gate_up": rng.standard_normal((256, 128)), "down": rng.standard_normal((128, 128))}
    layout = build_layout({k: v.shape for k, v in weights.items()}, "msb", 128)
    packed = pack_expert(layout, {k: quantize(v, "msb", 128) for k, v in weights.items()})
    return layout, np.frombuffer(packed, np.uint8).copy(), rng.standard_normal((1, 128)).astype(np.float32)


def _call_experts() -> None:
    layout, buf, x = _tiny_expert()
    moe_ffn_units(layout, to_units(layout, buf), np.arange(8)[None], np.array([4]), x,  # the runtime's call
                  np.array([0, 1]), np.zeros(1, np.int64), np.ones(1, np.float32))
    expert_ffn(layout, buf, x, 4)


def _call_nested() -> None:
    layout, buf, x = _tiny_expert()
    nested_matmul(layout, buf, "down", x, 4)


def _call_dense(bits: int) -> None:
    x, scale, minimum = np.ones((1, 128), np.float32), np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32)
    if bits == 8:
        byte_matmul(np.zeros((8, 128), np.uint8), scale, minimum, x)
    else:
        nibble_matmul(np.zeros((8, 64), np.uint8), scale, minimum, x)


def _call_forms() -> None:
    layout, buf, _ = _tiny_expert()
    if nibble_form(layout):
        arena = to_units(layout, buf)
        rewrite_form(layout, arena, np.arange(8), PLANE_FORM, LUT_FORM)
        rewrite_form(layout, arena, np.arange(8), LUT_FORM, NIBBLE_FORM)


def _call_attention() -> None:
    heads, cache = np.ones((2, 8), np.float32), np.zeros((4, 1, 8), np.float32)
    attention.decode_attention(heads, heads[:1].copy(), heads[:1].copy(), heads[0], heads[0], 1,
                               np.float32(1e-6), heads[0], heads[0], cache, cache.copy(), 0,
                               np.empty_like(heads))
    attention.rms_rows(heads, heads[0], np.float32(1e-6), np.empty_like(heads))
    attention.add_rms_rows(heads, heads.copy(), heads[0], np.float32(1e-6), np.empty_like(heads))
    attention.prefill_attention(heads.reshape(1, 2, 8), cache, cache, 0, np.empty((1, 2, 8), np.float32))
    attention.route_token(heads[0], heads, True, np.empty(1, np.float32), np.empty(1, np.int64))
    attention.route_rows(heads, heads, True, np.empty((2, 1), np.float32), np.empty((2, 1), np.int64))


CALLS = {"experts": _call_experts, "dense8": lambda: _call_dense(8), "dense4": lambda: _call_dense(4),
         "nested": _call_nested, "forms": _call_forms, "attention": _call_attention}


def call_group(name: str) -> None:
    """Call each entry point of a group once on tiny inputs: compiles it, or loads it from numba's cache.
    One signature each serves every scheme, width and token count (those are runtime arguments)."""
    CALLS[name]()


def call_every_kernel() -> None:
    for name in GROUPS:
        call_group(name)
