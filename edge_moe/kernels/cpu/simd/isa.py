"""What numba's target CPU has (GFNI, STRIDED and the finer flags), the LLVM vector types as numba types,
and the IR helpers every SIMD module builds with."""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import models, register_model

_I1, _I8, _I16, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_VB = ir.VectorType(_I8, 64)
_VI = ir.VectorType(_I32, 16)
_VF = ir.VectorType(_F32, 16)
_VH = ir.VectorType(ir.HalfType(), 16)


class _Vec(types.Type):
    def __init__(self, name, llty):
        self.llty = llty
        super().__init__(name=name)


_u8x64 = _Vec("u8x64", _VB)
_i32x16 = _Vec("i32x16", _VI)
_f32x16 = _Vec("f32x16", _VF)
_V32 = ir.VectorType(_I8, 32)  # the AVX2 kernels' 256-bit vectors
_V8I = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(_F32, 8)
_i32x8 = _Vec("i32x8", _V8I)
_f32x8 = _Vec("f32x8", _V8F)


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llty)


def _has(*names: str) -> bool:
    """Whether numba's target CPU has all these LLVM features (e.g. "+avx512vnni")."""
    if config.CPU_NAME and not config.CPU_FEATURES:
        return False  # a named (e.g. generic) target without features: stay portable
    features = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return all(n in features.split(",") for n in names)


_VNNI = _has("+avx512vnni")
_AVX2 = _has("+avx2")
_F16C = _has("+f16c")
_BYTE_MASKS = _has("+avx512bw")  # a 64-bit word is a byte-select mask register (kmovq)
GFNI = _has("+gfni", "+avx512vbmi", "+avx512bw")  # _codes512 is compiled only where this holds
STRIDED = _AVX2 and not GFNI  # the 256-bit transpose GEMV (_dot256) is compiled only where this holds


def _ptr(builder, a, llty):
    return builder.inttoptr(a, llty.as_pointer())


def _splat(builder, val, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _lanes(n, start=0):
    """The constant lane indices start..start+n-1 (a shuffle mask)."""
    return ir.Constant(ir.VectorType(_I32, n), list(range(start, start + n)))


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)
