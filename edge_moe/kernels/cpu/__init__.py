"""CPU backend (numba): nested bit-plane matmuls and the fused MoE FFN; same ops as `reference`.

How the kernels work: README.md in this folder. The ops live in `ops`, the storage forms of resident
experts in `forms`, the warm-up's entry points in `warmup`.
"""

from edge_moe.kernels.cpu.constants import (
    ACT8_MAX_BITS,
    LUT_FORM,
    LUT_ROWS,
    NIBBLE_FORM,
    PLANE_FORM,
    ROWS_PER_ITEM,
)
from edge_moe.kernels.cpu.forms import (
    NIBBLE_BITS,
    ResidentForms,
    resident_forms,
    rewrite_form,
    to_lut_form,
    to_nibble_form,
)
from edge_moe.kernels.cpu.ops import (
    byte_matmul,
    expert_ffn,
    expert_ffn_units,
    moe_ffn,
    moe_ffn_units,
    nested_matmul,
    nested_matmul_units,
    nibble_matmul,
)
from edge_moe.kernels.cpu.plan import lut_form, nibble_form
from edge_moe.kernels.cpu.simd.isa import GFNI, STRIDED

__all__ = [  # ops, storage forms, constants other modules read
    "byte_matmul", "expert_ffn", "expert_ffn_units", "moe_ffn", "moe_ffn_units", "nested_matmul",
    "nested_matmul_units", "nibble_matmul",
    "NIBBLE_BITS", "ResidentForms", "lut_form", "nibble_form", "resident_forms", "rewrite_form", "to_lut_form",
    "to_nibble_form",
    "ACT8_MAX_BITS", "GFNI", "LUT_FORM", "LUT_ROWS", "NIBBLE_FORM", "PLANE_FORM", "ROWS_PER_ITEM", "STRIDED",
]
