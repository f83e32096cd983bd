"""SIMD values for the CPU kernels: LLVM vectors as numba types and the few operations they need.

Addresses are plain integers (intp) so that hot loops carry no array reference counting.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

_I1, _I8, _I32, _I64, _F32 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
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


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llty)


def _has_vnni() -> bool:
    if config.CPU_NAME and not config.CPU_FEATURES:
        return False  # a named (e.g. generic) target without features: stay portable
    features = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return "+avx512vnni" in features


_VNNI = _has_vnni()


def _ptr(builder, a, llty):
    return builder.inttoptr(a, llty.as_pointer())


def _splat(builder, val, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


@intrinsic
def _addr(typingctx, arr):
    def codegen(context, builder, sig, args):
        return builder.ptrtoint(context.make_array(sig.args[0])(context, builder, args[0]).data, _I64)
    return types.intp(arr), codegen


@intrinsic
def _qzero(typingctx):
    return _u8x64(), lambda context, builder, sig, args: ir.Constant(_VB, [0] * 64)


@intrinsic
def _izero(typingctx):
    return _i32x16(), lambda context, builder, sig, args: ir.Constant(_VI, [0] * 16)


@intrinsic
def _fzero(typingctx):
    return _f32x16(), lambda context, builder, sig, args: ir.Constant(_VF, [0.0] * 16)


@intrinsic
def _qload(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _VB), align=1)
    return _u8x64(types.intp), codegen


@intrinsic
def _qstore(typingctx, q, a):
    def codegen(context, builder, sig, args):
        builder.store(args[0], _ptr(builder, args[1], _VB), align=1)
        return context.get_dummy_value()
    return types.none(q, types.intp), codegen


@intrinsic
def _qmask_add(typingctx, q, a, v):
    """q + v in the byte lanes whose bit is set in the 64-bit plane word at address a.

    v must come from memory (_qload): with a constant LLVM proves the bits disjoint, rewrites the
    add as an or, and byte-masked or does not exist (2 instructions instead of 1)."""
    def codegen(context, builder, sig, args):
        q, a, v = args
        mask = builder.bitcast(builder.load(_ptr(builder, a, _I64), align=1), ir.VectorType(_I1, 64))
        return builder.select(mask, builder.add(q, v), q)
    return _u8x64(q, types.intp, v), codegen


@intrinsic
def _dpbusd(typingctx, acc, q, a):
    """acc + per int32 lane the sum of 4 products u8 q * s8 x, x the 64 bytes at address a."""
    def codegen(context, builder, sig, args):
        acc, q, a = args
        x = builder.load(_ptr(builder, a, _VB), align=1)
        if _VNNI:
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _VI,
                         [acc, builder.bitcast(q, _VI), builder.bitcast(x, _VI)])
        wide = ir.VectorType(_I32, 64)  # portable form: LLVM picks what the target has
        prod = builder.mul(builder.zext(q, wide), builder.sext(x, wide))
        for k in range(4):
            lanes = ir.Constant(ir.VectorType(_I32, 16), [4 * i + k for i in range(16)])
            acc = builder.add(acc, builder.shuffle_vector(prod, ir.Constant(wide, ir.Undefined), lanes))
        return acc
    return _i32x16(acc, q, types.intp), codegen


@intrinsic
def _join_digits(typingctx, h, lo):
    """float((h << 8) + lo) lane-wise: the dot with the int16 activations."""
    def codegen(context, builder, sig, args):
        h, lo = args
        return builder.sitofp(builder.add(builder.shl(h, _splat(builder, ir.Constant(_I32, 8), _VI)), lo), _VF)
    return _f32x16(h, lo), codegen


@intrinsic
def _fma_s(typingctx, acc, v, c):
    """acc + v * c (c a scalar)."""
    def codegen(context, builder, sig, args):
        acc, v, c = args
        return _call(builder, "llvm.fma.v16f32", _VF, [v, _splat(builder, c, _VF), acc])
    return _f32x16(acc, v, types.float32), codegen


@intrinsic
def _fma_v(typingctx, acc, a, b):
    """acc + a * b lane-wise."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v16f32", _VF, [args[1], args[2], args[0]])
    return _f32x16(acc, a, b), codegen


@intrinsic
def _fmul(typingctx, a, b):
    return _f32x16(a, b), lambda context, builder, sig, args: builder.fmul(args[0], args[1])


@intrinsic
def _fadd(typingctx, a, b):
    return _f32x16(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


@intrinsic
def _fsub(typingctx, a, b):
    return _f32x16(a, b), lambda context, builder, sig, args: builder.fsub(args[0], args[1])


@intrinsic
def _fload(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _VF), align=4)
    return _f32x16(types.intp), codegen


@intrinsic
def _fstore(typingctx, v, a):
    def codegen(context, builder, sig, args):
        builder.store(args[0], _ptr(builder, args[1], _VF), align=4)
        return context.get_dummy_value()
    return types.none(v, types.intp), codegen


@intrinsic
def _fsum(typingctx, v):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _VF]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=("reassoc",))
    return types.float32(v), codegen


@intrinsic
def _ldi(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _I64), align=8)
    return types.intp(types.intp), codegen


@intrinsic
def _fsplat(typingctx, c):
    return _f32x16(types.float32), lambda context, builder, sig, args: _splat(builder, args[0], _VF)


@intrinsic
def _fone(typingctx):
    return _f32x16(), lambda context, builder, sig, args: ir.Constant(_VF, [1.0] * 16)


@intrinsic
def _ldf(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _F32), align=4)
    return types.float32(types.intp), codegen


@intrinsic
def _h2f(typingctx, a, n):
    """The first n (<= 16) fp16 values at address a as floats, zeros after (a masked load)."""
    def codegen(context, builder, sig, args):
        a, n = args
        lanes = ir.Constant(ir.VectorType(_I64, 16), list(range(16)))
        mask = builder.icmp_signed("<", lanes, _splat(builder, n, ir.VectorType(_I64, 16)))
        h = _call(builder, "llvm.masked.load.v16f16.p0", _VH,
                  [_ptr(builder, a, _VH), ir.Constant(_I32, 2), mask, ir.Constant(_VH, [0.0] * 16)])
        return builder.fpext(h, _VF)
    return _f32x16(types.intp, types.intp), codegen
