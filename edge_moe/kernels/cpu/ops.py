"""The registered ops (same signatures as kernels.reference): checks, outputs, and the entry kernels.
A numpy input gives a numpy output and a torch tensor a tensor; this module never imports torch."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import numpy as np
from numba import get_num_threads, njit

from edge_moe.errors import UsageError
from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.kernels.cpu.constants import _FORMS, _POWERS, LUT_FORM, NIBBLE_FORM, PLANE_FORM
from edge_moe.kernels.cpu.dense import _byte_matmul_kernel, _nibble_matmul_kernel
from edge_moe.kernels.cpu.entry import _ffn_kernel, _matmul_kernel
from edge_moe.kernels.cpu.plan import _Plan, _plan
from edge_moe.kernels.cpu.simd.common import _addr

if TYPE_CHECKING:
    import torch


def _check_bits(plan: _Plan, nbytes: int, bits: int, what: str) -> int:
    bits = int(bits)
    if not BASE_BITS <= bits <= MAX_BITS:
        raise UsageError(f"bits must be in {BASE_BITS}..{MAX_BITS}, got {bits}")
    if nbytes < plan.need[bits - BASE_BITS]:
        raise UsageError(f"{what} holds {nbytes} bytes, {bits} bits need {plan.need[bits - BASE_BITS]}")
    return bits


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _tensor_type():
    """torch.Tensor if this process has imported torch (a tensor can only come from there), else None:
    the ops take and give numpy arrays without importing torch (the compile children import none)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _out(out: np.ndarray, x):
    """out as the caller's kind: a tensor for a tensor input, else the array."""
    tensor = _tensor_type()
    return sys.modules["torch"].from_numpy(out) if tensor is not None and isinstance(x, tensor) else out


def _as_x(x, n: int) -> np.ndarray:
    tensor = _tensor_type()
    if tensor is not None and isinstance(x, tensor):
        torch = sys.modules["torch"]
        x = x if x.dtype == torch.float32 else x.float()
        x = (x.detach() if x.requires_grad else x).numpy()  # detach only if needed: each torch op costs
    else:
        x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != n:
        raise UsageError(f"x has shape {tuple(x.shape)}, expected [T, {n}]")
    return np.ascontiguousarray(x, dtype=np.float32)


def nested_matmul(layout: ExpertLayout, buf: np.ndarray, matrix: str, x: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W_b.T."""
    plan = _plan(layout)
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    bits = _check_bits(plan, buf.nbytes, bits, "expert buffer")
    return _matmul(plan, matrix, _address(buf) + plan.starts, bits, PLANE_FORM, x)


def nested_matmul_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, matrix: str,
                        x: torch.Tensor, bits: int, form: int = PLANE_FORM) -> torch.Tensor:
    """nested_matmul on an expert held as arena units (the expert cache's form) in `form` (PLANE_FORM;
    NIBBLE_FORM: rewritten by to_nibble_form; LUT_FORM: by to_lut_form, at 2 bits)."""
    plan = _plan(layout)
    ca = _checked_units(plan, arena, np.asarray(units, np.int64)[None], np.array([bits], np.int64),
                        np.array([form], np.int8))[0]
    return _matmul(plan, matrix, ca, int(bits), int(form), x)


def _matmul(plan: _Plan, matrix: str, ca: np.ndarray, bits: int, form: int, x) -> torch.Tensor:
    md = plan.md[matrix]
    xs = _as_x(x, int(md[1]))
    out = np.zeros((xs.shape[0], int(md[0])), dtype=np.float32)
    if xs.shape[0]:
        _matmul_kernel(ca, md, bits, plan.mwq, form, xs, _POWERS, out)
    return _out(out, x)


def byte_matmul(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W.T for W as 8-bit byte codes (see reference.byte_matmul)."""
    return _code_matmul(_byte_matmul_kernel, "byte", 1, 32, codes, scale, minimum, x)


def nibble_matmul(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W.T for W as 4-bit nibble codes (see reference.nibble_matmul)."""
    return _code_matmul(_nibble_matmul_kernel, "nibble", 2, 128, codes, scale, minimum, x)


@functools.cache
def _code_md(o: int, n: int, group: int, ng: int) -> np.ndarray:
    """The kernels' matrix descriptor of codes [O, ng*G] read with n inputs, shared by every call (the
    kernels never write it; a read-only array would be another numba type, compiled again)."""
    return np.array([o, n, group, ng, -(-ng // 16) * 16, 0, 0, 0], np.int64)


def _code_matmul(kernel, what: str, per_byte: int, unit: int, codes, scale, minimum, x) -> torch.Tensor:
    """x @ W.T on `kernel` for W as codes [O, ng*G / per_byte] with scale and minimum [O, ng]; G a
    multiple of unit, and x [T, N] must end in the last group."""
    o, ng = scale.shape
    width = per_byte * codes.shape[1]
    group = width // ng
    xs = _as_x(x, x.shape[-1])
    fits = width - group < xs.shape[1] <= width
    if codes.dtype != np.uint8 or codes.shape[0] != o or group % unit or not fits:
        raise UsageError(f"{what} codes {codes.dtype} {codes.shape} with scales {scale.shape} "
                         f"do not fit x {tuple(xs.shape)}")
    md = _code_md(o, xs.shape[1], group, ng)
    out = np.zeros((xs.shape[0], o), dtype=np.float32)
    if xs.shape[0]:
        kernel(codes, scale, minimum, xs, md, out)
    return _out(out, x)


def _ffn(plan: _Plan, cas: np.ndarray, bits: np.ndarray, x, ptr, tokens, weights, forms=None) -> np.ndarray:
    md_gu, md_dn = plan.md["gate_up"], plan.md["down"]
    xs = _as_x(x, int(md_gu[1]))
    out = np.zeros((xs.shape[0], int(md_dn[0])), dtype=np.float32)
    forms = np.zeros(len(cas), np.int8) if forms is None else forms
    if len(cas) and xs.shape[0]:
        _ffn_kernel(cas, np.asarray(bits, np.int64), forms, plan.mwq, xs, np.asarray(ptr, np.int64),
                    np.asarray(tokens, np.int64), np.asarray(weights, np.float32), md_gu, md_dn, _POWERS, out,
                    get_num_threads())
    return out


def _single(plan: _Plan, cas: np.ndarray, bits: int, x) -> torch.Tensor:
    T = x.shape[0]
    return _out(_ffn(plan, cas[None], np.array([bits]), x, np.array([0, T]), np.arange(T),
                     np.ones(T, np.float32)), x)


def expert_ffn(layout: ExpertLayout, buf: np.ndarray, x: torch.Tensor, bits: int) -> torch.Tensor:
    """SwiGLU expert at `bits`: down(silu(gate(x)) * up(x)), x [T, D] -> [T, D]."""
    plan = _plan(layout)
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    bits = _check_bits(plan, buf.nbytes, bits, "expert buffer")
    return _single(plan, _address(buf) + plan.starts, bits, x)


def expert_ffn_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, x: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """expert_ffn on an expert whose chunk c lives in arena[units[c]] (the expert cache's form)."""
    plan = _plan(layout)
    bits = _check_bits(plan, plan.need[-1], bits, "layout")
    units = np.asarray(units, dtype=np.int64)[:MAX_BITS]
    if arena.dtype != np.uint8 or not arena.flags.c_contiguous or (units[:bits] < 0).any():
        raise UsageError(f"arena must be C-contiguous uint8 holding chunks 0..{bits - 1}; units {units}")
    return _single(plan, np.where(units >= 0, _address(arena) + units * arena.strides[0], 0), bits, x)


def moe_ffn_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, bits: np.ndarray,
                  x: torch.Tensor, ptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray,
                  form: np.ndarray | None = None) -> torch.Tensor:
    """A layer's active experts held as arena units, in one call (see reference.moe_ffn_units);
    form[j]: how entry j is held (PLANE_FORM, the default; NIBBLE_FORM: to_nibble_form, it then holds
    chunks 0..3; LUT_FORM: to_lut_form, at 2 bits; booleans read as nibble form or not)."""
    plan = _plan(layout)
    bits = np.asarray(bits, dtype=np.int64)
    units = np.asarray(units, dtype=np.int64).reshape(len(bits), -1)
    forms = np.zeros(len(bits), np.int8) if form is None else np.asarray(form, np.int8)
    cas = _checked_units(plan, arena, units, bits, forms)
    return _out(_ffn(plan, cas, bits, x, ptr, tokens, weights, forms), x)


def _checked_units(plan: _Plan, arena: np.ndarray, units: np.ndarray, bits: np.ndarray,
                   forms: np.ndarray) -> np.ndarray:
    """Chunk addresses [E, 8] of entries held as arena units [E, >= 8] (_unit_addresses), or a
    UsageError naming the first entry that cannot run."""
    if arena.dtype != np.uint8 or not arena.flags.c_contiguous:
        raise UsageError("arena must be a C-contiguous uint8 array")
    units = units[:, :MAX_BITS]
    cas, bad = _unit_addresses(units, bits, forms, plan.forms, arena)
    if bad >= 0 and units.shape[1] < MAX_BITS:
        raise UsageError(f"units must be {MAX_BITS} unit indices (-1: not held) per entry, got shape "
                         f"{units.shape}")
    if bad >= 0:
        f, has = int(forms[bad]), [n for k, n in _FORMS.items() if plan.forms >> k & 1]
        raise UsageError(f"entry {bad} at {bits[bad]} bits in form {f} ({_FORMS.get(f, 'unknown')}; this "
                         f"layout's forms on this CPU: {has}) "
                         f"lacks chunks, is out of range {BASE_BITS}..{MAX_BITS} or not 2 bits in LUT form: "
                         f"units {units[bad]}")
    return cas


@njit(cache=True)
def _unit_addresses(units, bits, forms, forms_ok, arena):
    """(chunk addresses [E, 8] of entries held in units of arena (C-contiguous uint8 [U, unit bytes]), 0
    where not held; -1, or the first entry whose bits are out of range, whose form this layout lacks
    (bit f of forms_ok), in LUT form at other than 2 bits, or that lacks a chunk it reads: 0..bits-1,
    and 0..3 in nibble form; 0 where units hold fewer than 8 per entry). One numba call: in numpy the
    same checks are a dozen small ops per layer."""
    E, base, stride = units.shape[0], _addr(arena), arena.shape[1]
    cas = np.zeros((E, MAX_BITS), np.int64)
    if units.shape[1] < MAX_BITS:  # fewer than 8 per entry: rejected, never read past
        return cas, 0
    for j in range(E):
        b = bits[j]
        f = forms[j]
        if b < BASE_BITS or b > MAX_BITS or f < 0 or f > LUT_FORM or not (forms_ok >> f) & 1 or (
                f == LUT_FORM and b != 2):
            return cas, j
        need = max(b, 4) if f == NIBBLE_FORM else b
        for c in range(MAX_BITS):
            if units[j, c] >= 0:
                cas[j, c] = base + units[j, c] * stride
            elif c < need:
                return cas, j
    return cas, -1


def moe_ffn(layout: ExpertLayout, slab: np.ndarray, slots: np.ndarray, bits: np.ndarray,
            x: np.ndarray, ptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """All of a layer's active experts in one call (see reference.moe_ffn for the CSR contract)."""
    plan = _plan(layout)
    if slab.dtype != np.uint8 or slab.ndim != 2 or not slab.flags.c_contiguous:
        raise UsageError(f"slab must be a C-contiguous uint8 [S, B] array, got {slab.dtype} {slab.shape}")
    for b in np.asarray(bits).tolist():
        _check_bits(plan, slab.shape[1], b, "slab row")
    slots = np.asarray(slots, dtype=np.int64)
    return _ffn(plan, _address(slab) + slots[:, None] * slab.strides[0] + plan.starts, bits, x, ptr, tokens,
                weights)
