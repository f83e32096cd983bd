"""Storage forms of resident experts: the nibble and LUT rewrites, and which form an expert takes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from edge_moe.errors import UsageError
from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import MAX_BITS
from edge_moe.kernels.cpu.constants import _FORMS, LUT_FORM, LUT_ROWS, NIBBLE_FORM, PLANE_FORM
from edge_moe.kernels.cpu.gemv_nibble import _nibble_bits
from edge_moe.kernels.cpu.plan import _plan, lut_form, nibble_form
from edge_moe.kernels.cpu.simd.common import _addr

NIBBLE_BITS = (3, 4)  # widths whose experts take the nibble form: it reads 4 bits, so at 2 the planes read
# half as much, and above 4 its added planes 4.. cost more than the planes' own 8-plane transpose
NIBBLE_CHUNKS = 4  # chunks 0..3, which the nibble form rewrites: an expert needs them all, evicted together


@njit(cache=True, nogil=True)
def _to_nibbles(arena, units, md):
    """Planes 0-3 of matrix md in arena units[0..3] -> nibble rows (_nibble_addr): per 4 rows the same
    bytes, so the rewrite is in place (from a copy of those bytes; _nibble_rows' words)."""
    rb, poff = md[5], md[6]
    planes = np.empty((4, 4 * rb), np.uint8)
    P = _addr(planes)
    for k in range(md[0] // 4):
        s = poff + 4 * k * rb
        for p in range(4):
            planes[p] = arena[units[p], s:s + 4 * rb]
        for j in range(4):
            dst = arena[units[j], s:s + 4 * rb]
            for b in range(rb // 8):
                for h in range(4):
                    a = P + j * rb + 8 * b + h  # plane p's byte at a + 4 rb p
                    v = (_nibble_bits(a, 3) | _nibble_bits(a + 4 * rb, 2) | _nibble_bits(a + 8 * rb, 1)
                         | _nibble_bits(a + 12 * rb, 0))
                    for i in range(8):
                        dst[32 * b + 8 * h + i] = np.uint8((v >> np.uint64(8 * i)) & np.uint64(0xFF))


def to_nibble_form(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray) -> None:
    """Rewrite planes 0-3 of an expert held in arena units (its chunks 0..3) as nibble codes, in place;
    its metadata and planes 4.. are unchanged. Kernels then take it with form=NIBBLE_FORM (there is no
    way back: the runtime rewrites only experts that stay resident)."""
    units = np.asarray(units, dtype=np.int64)[:4]
    if not nibble_form(layout) or len(units) < 4 or (units < 0).any() or arena.dtype != np.uint8:
        raise UsageError(f"no nibble form for this layout on this CPU, or units {units} lack chunks 0..3")
    for md in _plan(layout).md.values():
        _to_nibbles(arena, units, md)


def to_lut_form(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, back: bool = False) -> None:
    """Rewrite planes 0-1 of an expert held in arena units (its chunks 0, 1) in LUT form, in place (back:
    the reverse): per block of LUT_ROWS rows and group of 128 inputs, a plane's 16 x 16 bytes transposed
    so that one 32-byte load holds plane bytes 2s and 2s + 1 of the 16 rows (_lut2_dot16), and the
    block's scales and minima by group, 16 rows side by side (_lut_transpose). Kernels then take it with
    form=LUT_FORM, at 2 bits; everything else in its chunks is unchanged."""
    units = np.asarray(units, dtype=np.int64)[:2]
    if not lut_form(layout) or len(units) < 2 or (units < 0).any() or arena.dtype != np.uint8:
        raise UsageError(f"no LUT form for this layout on this CPU, or units {units} lack chunks 0, 1")
    for md in _plan(layout).md.values():
        _lut_transpose(arena, units, md, back)


@njit(cache=True, nogil=True)
def _lut_transpose(arena, units, md, back):
    """Planes 0, 1 of matrix md: the bytes of row r, group g, byte j (plane form: r rb + 16 g + j) at
    256 g + 32 (j // 2) + 16 (j % 2) + r of each block of LUT_ROWS rows; its fp16 scales (chunk 0) and
    minima (chunk 1), [O, ng] row-major, at 16 g + r of each block's 16 ng: or back."""
    ng, rb, poff, moff = md[3], md[5], md[6], md[7]
    planes, meta = np.empty(LUT_ROWS * rb, np.int64), np.empty(LUT_ROWS * ng, np.int64)  # plane i -> LUT
    for r in range(LUT_ROWS):
        for g in range(ng):
            meta[r * ng + g] = 16 * g + r
            for j in range(16):
                planes[r * rb + 16 * g + j] = 256 * g + 32 * (j // 2) + 16 * (j % 2) + r
    for p in range(2):
        for b in range(md[0] // LUT_ROWS):
            s = poff + b * LUT_ROWS * rb
            _permute(arena[units[p], s:s + LUT_ROWS * rb], planes, back)
            s = moff + 2 * b * LUT_ROWS * ng
            _permute(arena[units[p], s:s + 2 * LUT_ROWS * ng].view(np.uint16), meta, back)


@njit(inline='always')
def _permute(a, order, back):
    """a[order[i]] = a[i] for every i, in place (back: a[i] = a[order[i]])."""
    was = a.copy()
    if back:
        a[:] = was[order]
    else:
        a[order] = was


def rewrite_form(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, old: int, new: int) -> None:
    """Turn an expert held in arena units from form `old` into `new`, in place: planes <-> LUT form,
    planes or LUT form -> nibble form (there is no way back from the nibble form)."""
    if old == new:
        return
    if old == NIBBLE_FORM or new not in _FORMS:
        raise UsageError(f"no rewrite from form {old} to form {new}")
    if old == LUT_FORM:
        to_lut_form(layout, arena, units, back=True)
    if new == NIBBLE_FORM:
        to_nibble_form(layout, arena, units)
    elif new == LUT_FORM:
        to_lut_form(layout, arena, units)


class ResidentForms:
    """How the cpu backend keeps an arena's resident experts: opaque int8 tags, 0 = the file's planes."""

    def __init__(self, layout: ExpertLayout, arena: np.ndarray):
        self.layout, self.arena = layout, arena
        # table[form, held, bits]: the form an expert now in `form`, holding `held` chunks, should take
        # to run at `bits` (int8 [n_forms, MAX_BITS + 1, MAX_BITS + 1])
        self.table = _form_table(lut_form(layout))
        self.together = np.zeros(len(_FORMS), np.int64)  # chunks of an expert in that form evicted together
        self.together[NIBBLE_FORM] = NIBBLE_CHUNKS

    def want(self, form: int, held: int, widths: Sequence[int]) -> int:
        """The one form that serves every width an expert runs at in one call: the nibble form's, if a
        width is 3-4 bits (it serves every width), else the widest width's."""
        widest = NIBBLE_BITS[-1] if any(b in NIBBLE_BITS for b in widths) else max(widths)
        return int(self.table[form, held, widest])

    def rewrite(self, units: np.ndarray, old: int, new: int) -> None:
        """Turn the expert held in arena units from form `old` into `new`, in place (rewrite_form)."""
        rewrite_form(self.layout, self.arena, units, old, new)


def resident_forms(layout: ExpertLayout, arena: np.ndarray) -> ResidentForms | None:
    """The forms of experts of this layout resident in arena (C-contiguous uint8 [U, unit bytes]), or None
    where the kernels have none for it on this CPU (nibble_form false): they then stay planes."""
    return ResidentForms(layout, arena) if nibble_form(layout) else None


def _form_table(lut: bool) -> np.ndarray:
    """ResidentForms.table, with the LUT form where lut (lut_form)."""
    table = np.empty((len(_FORMS), MAX_BITS + 1, MAX_BITS + 1), np.int8)
    for form, held, bits in np.ndindex(table.shape):
        table[form, held, bits] = _next_form(form, held, bits, lut)
    return table


def _next_form(form: int, held: int, bits: int, lut: bool) -> int:
    """The nibble form at NIBBLE_BITS once chunks 0..3 are held (planes until then); the LUT form at 2 bits,
    from planes, where lut; planes again from the LUT form at other widths; the nibble form is never left
    (its planes 0-3 are overwritten)."""
    if form == NIBBLE_FORM:
        return NIBBLE_FORM
    if bits in NIBBLE_BITS:
        return NIBBLE_FORM if held >= NIBBLE_CHUNKS else PLANE_FORM
    if bits == 2:
        return LUT_FORM if lut and form == PLANE_FORM else form
    return PLANE_FORM
