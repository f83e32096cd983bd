"""Per-layout constants of the kernels (matrix descriptors, chunk offsets) and which storage forms a
layout has on this CPU."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edge_moe.errors import UsageError
from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import num_groups
from edge_moe.kernels.cpu.constants import LUT_FORM, LUT_ROWS, MAX_GROUP, NIBBLE_FORM, PLANE_FORM
from edge_moe.kernels.cpu.simd.isa import STRIDED


def nibble_form(layout: ExpertLayout) -> bool:
    """Whether resident experts of this layout run faster rewritten in nibble form (to_nibble_form):
    msb at group 128 on AVX2 without AVX-512 (STRIDED), where the plane GEMV is bound by its bit
    transpose; every row count a multiple of 4."""
    return (STRIDED and layout.scheme == "msb" and layout.group == 128
            and all(o % 4 == 0 for _, (o, _n) in layout.matrices))


def lut_form(layout: ExpertLayout) -> bool:
    """Whether experts of this layout run at 2 bits faster rewritten in LUT form (to_lut_form): msb at
    group 128 on AVX2 without AVX-512 (STRIDED); every row count a multiple of LUT_ROWS."""
    return (STRIDED and layout.scheme == "msb" and layout.group == 128
            and all(o % LUT_ROWS == 0 for _, (o, _n) in layout.matrices))


class _Plan(NamedTuple):
    """Per-layout constants of the kernels."""

    md: dict  # matrix name -> descriptor (int64 [8])
    starts: np.ndarray  # chunk offsets in a contiguous expert buffer (int64 [8])
    need: tuple  # need[b - 2]: bytes of b bits
    mwq: bool
    forms: int  # bit f set: this layout has form f on this CPU (PLANE_FORM, nibble_form, lut_form)


_PLANS: dict[int, tuple[ExpertLayout, _Plan]] = {}  # id -> (layout, plan); layouts live with models


def _plan(layout: ExpertLayout) -> _Plan:
    hit = _PLANS.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit[1]
    g = layout.group
    if g > MAX_GROUP:
        raise UsageError(f"group size {g} is above the cpu backend's limit of {MAX_GROUP}; "
                         f"convert with a smaller --group or use --backend reference")
    md = {}
    for name, (o, n) in layout.matrices:
        ng = num_groups(n, g)
        md[name] = np.array([o, n, g, ng, -(-ng // 16) * 16, ng * g // 8, layout.in_chunk(name, "planes"),
                             layout.in_chunk(name, "meta")], dtype=np.int64)
    plan = _Plan(md, np.asarray(layout.chunk_starts, dtype=np.int64), layout.level_ends, layout.scheme == "mwq",
                 1 << PLANE_FORM | nibble_form(layout) << NIBBLE_FORM | lut_form(layout) << LUT_FORM)
    _PLANS[id(layout)] = (layout, plan)
    return plan
