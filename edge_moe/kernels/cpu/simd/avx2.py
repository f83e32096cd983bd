"""256-bit (AVX2) dots of nibble and small byte codes with int8 activations, and the 8-lane float
arithmetic the AVX2 GEMVs accumulate in; portable LLVM forms where other targets call them."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from edge_moe.kernels.cpu.simd.common import _constant
from edge_moe.kernels.cpu.simd.isa import (
    _AVX2,
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _V8F,
    _V8I,
    _V32,
    _VB,
    _VF,
    _call,
    _f32x8,
    _f32x16,
    _i32x8,
    _i32x16,
    _lanes,
    _ptr,
    _splat,
    _u8x64,
)


def _maddubs(builder, q, x):
    """vpmaddubsw of u8 q and s8 x (32 lanes each; exact while no pair sum passes 32767): int16 x 16,
    lane i holding q[2i] x[2i] + q[2i+1] x[2i+1]; the portable form elsewhere."""
    v16 = ir.VectorType(_I16, 16)
    if _AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [q, x])
    prod = builder.mul(builder.zext(q, ir.VectorType(_I16, 32)), builder.sext(x, ir.VectorType(_I16, 32)))
    pick = [ir.Constant(ir.VectorType(_I32, 16), list(range(k, 32, 2))) for k in (0, 1)]
    return builder.add(*(builder.shuffle_vector(prod, prod, m) for m in pick))


def _madd_ones(builder, h):
    """Pairs of the int16 x 16 h summed into int32 x 8 (vpmaddwd with ones)."""
    if _AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8),
                     [h, ir.Constant(ir.VectorType(_I16, 16), [1] * 16)])
    wide = builder.sext(h, ir.VectorType(_I32, 16))
    pick = [ir.Constant(ir.VectorType(_I32, 8), list(range(k, 16, 2))) for k in (0, 1)]
    return builder.add(*(builder.shuffle_vector(wide, wide, m) for m in pick))


@intrinsic
def _dot_nibbles(typingctx, acc, q, a):
    """_dpbusd for codes q <= 15 on AVX2: vpmaddubsw cannot saturate, so 2 of them, one add and one
    vpmaddwd per 64 inputs (the exact 16-bit form takes 16 instructions); int32 lanes 8-15 get 0."""
    def codegen(context, builder, sig, args):
        acc, q, a = args
        x = builder.load(_ptr(builder, a, _VB), align=1)
        v16 = ir.VectorType(_I16, 16)
        pair = [_call(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [builder.shuffle_vector(q, q, _lanes(32, k)),
                                                                   builder.shuffle_vector(x, x, _lanes(32, k))])
                for k in (0, 32)]
        d = _call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8),
                  [builder.add(*pair), ir.Constant(v16, [1] * 16)])
        zeros = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
        return builder.add(acc, builder.shuffle_vector(d, zeros, _lanes(16)))
    return _i32x16(acc, q, types.intp), codegen


def _nibble_halves(builder, q, k, mask):
    """The 64 codes of block k at q (_dot_nib128's order) as two byte vectors: the low nibbles (weights
    0-31 of the block) and the high ones (32-63), each ANDed with mask (an i8 vector)."""
    v16 = ir.VectorType(_I16, 16)
    v = builder.load(_ptr(builder, builder.add(q, ir.Constant(_I64, 32 * k)), _V32), align=1)
    high = builder.bitcast(builder.lshr(builder.bitcast(v, v16), ir.Constant(v16, [4] * 16)), _V32)
    return builder.and_(v, mask), builder.and_(high, mask)


@intrinsic
def _dot_nib128(typingctx, acc, q, x, mask):
    """acc + the dot of 128 nibble codes at q (64 bytes: per block of 64 weights, byte j holds weight j
    in its low nibble and weight j + 32 in its high one: format.nested.to_nibbles), each ANDed with
    mask (15: whole codes; 12 or 14: their top 2 or 3 bits), with 128 int8 at x, in int32 x 8. Per
    block: one 32-byte load, a 16-bit shift, two ANDs, two vpmaddubsw with x (in weight order); one
    vpmaddwd per 128 (4 x 2 x 15 x 128 fits int16). Fewer instructions than llama.cpp's Q4_0 order,
    blocks of 32, which takes a 16-byte load into both register halves and a per-dword shift per 32."""
    def codegen(context, builder, sig, args):
        acc, q, x, mask = args
        m = _splat(builder, builder.trunc(mask, _I8), _V32)
        h = None
        for k in range(2):
            for j, codes in enumerate(_nibble_halves(builder, q, k, m)):
                xa = builder.add(x, ir.Constant(_I64, 64 * k + 32 * j))
                d = _maddubs(builder, codes, builder.load(_ptr(builder, xa, _V32), align=1))
                h = d if h is None else builder.add(h, d)
        return builder.add(acc, _madd_ones(builder, h))
    return _i32x8(acc, types.intp, types.intp, types.intp), codegen


@intrinsic
def _nib_codes64(typingctx, q, mask, rshift):
    """Byte codes of the 64 weights whose nibbles (_dot_nib128's order) are the 32 bytes at q, in
    weight order: ((n & mask) << 4) >> rshift (rshift 0: msb units; 8 - b: the top b bits as a number)."""
    def codegen(context, builder, sig, args):
        q, mask, rshift = args
        low, high = _nibble_halves(builder, q, 0, _splat(builder, builder.trunc(mask, _I8), _V32))
        n = builder.shuffle_vector(low, high, _lanes(64))
        return builder.lshr(builder.shl(n, _splat(builder, ir.Constant(_I8, 4), _VB)),
                            _splat(builder, builder.trunc(rshift, _I8), _VB))
    return _u8x64(types.intp, types.intp, types.intp), codegen


_f8zero, _i8zero = _constant(_f32x8, 0.0), _constant(_i32x8, 0)


@intrinsic
def _f8add(typingctx, a, b):
    return _f32x8(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


@intrinsic
def _fma8(typingctx, acc, v, c):
    """acc + float(v) * c (a float32) over 8 lanes."""
    def codegen(context, builder, sig, args):
        acc, v, c = args
        return _call(builder, "llvm.fma.v8f32", _V8F, [builder.sitofp(v, _V8F), _splat(builder, c, _V8F), acc])
    return _f32x8(acc, v, types.float32), codegen


@intrinsic
def _fma_pair(typingctx, acc, v, c):
    """acc + float(v) * (C[g] in lanes 0-3, C[g+1] in 4-7), the two floats at address c."""
    def codegen(context, builder, sig, args):
        acc, v, c = args
        pair = builder.load(_ptr(builder, c, ir.VectorType(_F32, 2)), align=4)
        coef = builder.shuffle_vector(pair, pair, ir.Constant(_V8I, [0, 0, 0, 0, 1, 1, 1, 1]))
        return _call(builder, "llvm.fma.v8f32", _V8F, [builder.sitofp(v, _V8F), coef, acc])
    return _f32x8(acc, v, types.intp), codegen


@intrinsic
def _fma16(typingctx, acc, v, c):
    """acc + float(v) * c lane-wise (v int32 x 16, c float x 16)."""
    def codegen(context, builder, sig, args):
        acc, v, c = args
        return _call(builder, "llvm.fma.v16f32", _VF, [builder.sitofp(v, _VF), c, acc])
    return _f32x16(acc, v, c), codegen
