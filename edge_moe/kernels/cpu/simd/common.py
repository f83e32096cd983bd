"""SIMD operations every target compiles: addresses, scalar and vector loads and stores, the byte-code
dot (vpdpbusd with VNNI, vpmaddwd on AVX2, portable LLVM elsewhere) and the 16-lane float arithmetic.

Addresses are plain integers (intp) so that hot loops carry no array reference counting."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_moe.kernels.cpu.simd.isa import (
    _AVX2,
    _BYTE_MASKS,
    _F32,
    _I1,
    _I8,
    _I16,
    _I32,
    _I64,
    _VB,
    _VF,
    _VI,
    _VNNI,
    _call,
    _f32x8,
    _f32x16,
    _i32x16,
    _lanes,
    _ptr,
    _splat,
    _u8x64,
    _Vec,
)


@intrinsic
def _addr(typingctx, arr):
    def codegen(context, builder, sig, args):
        return builder.ptrtoint(context.make_array(sig.args[0])(context, builder, args[0]).data, _I64)
    return types.intp(arr), codegen


@intrinsic
def _ldi(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _I64), align=8)
    return types.intp(types.intp), codegen


@intrinsic
def _ldb(typingctx, a):
    """The byte at address a, zero-extended."""
    def codegen(context, builder, sig, args):
        return builder.zext(builder.load(_ptr(builder, args[0], _I8), align=1), _I64)
    return types.intp(types.intp), codegen


@intrinsic
def _ldf(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _F32), align=4)
    return types.float32(types.intp), codegen


@intrinsic
def _prefetch(typingctx, a):
    """Hint the cache line at address a into the cache hierarchy (no fault if a is out of range)."""
    def codegen(context, builder, sig, args):
        p = builder.inttoptr(args[0], _I8.as_pointer())
        _call(builder, "llvm.prefetch.p0", ir.VoidType(),
              [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(types.intp), codegen


def _constant(vec, value):
    """An intrinsic returning the vector `vec` (a _Vec) with `value` in every lane."""
    def constant(typingctx):
        return vec(), lambda context, builder, sig, args: ir.Constant(vec.llty, [value] * vec.llty.count)
    return intrinsic(constant)


_qzero, _izero, _fzero = _constant(_u8x64, 0), _constant(_i32x16, 0), _constant(_f32x16, 0.0)
_fone = _constant(_f32x16, 1.0)


@intrinsic
def _qload(typingctx, a):
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], _VB), align=1)
    return _u8x64(types.intp), codegen


@intrinsic
def _qload_n(typingctx, a, n):
    """The first n (<= 64) bytes at address a, zeros after (a masked load: nothing past n is touched)."""
    def codegen(context, builder, sig, args):
        a, n = args
        low = builder.sub(builder.shl(ir.Constant(_I64, 1), n), ir.Constant(_I64, 1))
        bits = builder.select(builder.icmp_signed(">=", n, ir.Constant(_I64, 64)), ir.Constant(_I64, -1), low)
        mask = builder.bitcast(bits, ir.VectorType(_I1, 64))
        return _call(builder, "llvm.masked.load.v64i8.p0", _VB,
                     [_ptr(builder, a, _VB), ir.Constant(_I32, 1), mask, ir.Constant(_VB, [0] * 64)])
    return _u8x64(types.intp, types.intp), codegen


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
        word = builder.load(_ptr(builder, a, _I64), align=1)
        if _BYTE_MASKS or not _AVX2:
            return builder.select(builder.bitcast(word, ir.VectorType(_I1, 64)), builder.add(q, v), q)
        # AVX2: byte i of the word to lanes 8i..8i+7 (vpshufb), one bit per lane kept, compared
        octets = builder.bitcast(word, ir.VectorType(_I8, 8))
        spread = builder.shuffle_vector(octets, ir.Constant(ir.VectorType(_I8, 8), ir.Undefined),
                                        ir.Constant(ir.VectorType(_I32, 64), [i // 8 for i in range(64)]))
        bit = ir.Constant(_VB, [1 << (i % 8) for i in range(64)])
        on = builder.sext(builder.icmp_unsigned("==", builder.and_(spread, bit), bit), _VB)
        return builder.add(q, builder.and_(on, v))
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
        if _AVX2:  # 16 exact u8 x s8 products per vpmaddwd on 16-bit lanes (vpmaddubsw saturates)
            return _madd_wd(builder, acc, q, x)
        wide = ir.VectorType(_I32, 64)  # portable form: LLVM picks what the target has
        prod = builder.mul(builder.zext(q, wide), builder.sext(x, wide))
        for k in range(4):
            lanes = ir.Constant(ir.VectorType(_I32, 16), [4 * i + k for i in range(16)])
            acc = builder.add(acc, builder.shuffle_vector(prod, ir.Constant(wide, ir.Undefined), lanes))
        return acc
    return _i32x16(acc, q, types.intp), codegen


def _pmaddwd32(builder, a, b):
    """vpmaddwd of two int16 x 32 vectors on AVX2 (two 256-bit halves): int32 x 16, lane i holding
    a[2i] b[2i] + a[2i+1] b[2i+1]."""
    halves = [[builder.shuffle_vector(v, v, _lanes(16, k)) for v in (a, b)] for k in (0, 16)]
    lo, hi = (_call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), h) for h in halves)
    return builder.shuffle_vector(lo, hi, _lanes(16))


def _madd_wd(builder, acc, q, x):
    """acc + the 64 products zext(q) * sext(x), summed by vpmaddwd into 16 int32 lanes each holding
    4 of them (not dpbusd's 4 adjacent ones: every caller sums all lanes of a group)."""
    v16 = ir.VectorType(_I16, 32)
    for k in (0, 32):
        qk = builder.zext(builder.shuffle_vector(q, q, _lanes(32, k)), v16)
        xk = builder.sext(builder.shuffle_vector(x, x, _lanes(32, k)), v16)
        acc = builder.add(acc, _pmaddwd32(builder, qk, xk))
    return acc


@intrinsic
def _dot_bytes(typingctx, acc, q, x):
    """acc + the 32 products of the bytes at q (u8) and the int16 values at x, summed in pairs by
    vpmaddwd into 16 int32 lanes."""
    def codegen(context, builder, sig, args):
        acc, q, x = args
        v16 = ir.VectorType(_I16, 32)
        qw = builder.zext(builder.load(_ptr(builder, q, ir.VectorType(_I8, 32)), align=1), v16)
        xw = builder.load(_ptr(builder, x, v16), align=2)
        if _BYTE_MASKS:
            d = _call(builder, "llvm.x86.avx512.pmaddw.d.512", _VI, [qw, xw])
        elif _AVX2:
            d = _pmaddwd32(builder, qw, xw)
        else:
            wide = ir.VectorType(_I32, 32)
            prod = builder.mul(builder.zext(qw, wide), builder.sext(xw, wide))
            pick = [ir.Constant(ir.VectorType(_I32, 16), list(range(k, 32, 2))) for k in (0, 1)]
            d = builder.add(*(builder.shuffle_vector(prod, prod, m) for m in pick))
        return builder.add(acc, d)
    return _i32x16(acc, types.intp, types.intp), codegen


@intrinsic
def _join_digits(typingctx, h, lo):
    """float((h << 8) + lo) lane-wise: the dot with the int16 activations."""
    def codegen(context, builder, sig, args):
        h, lo = args
        return builder.sitofp(builder.add(builder.shl(h, _splat(builder, ir.Constant(_I32, 8), _VI)), lo), _VF)
    return _f32x16(h, lo), codegen


@intrinsic
def _i2f(typingctx, h):
    """float(h) lane-wise: the dot with the int8 (high digit) activations."""
    return _f32x16(h), lambda context, builder, sig, args: builder.sitofp(args[0], _VF)


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
def _fsub(typingctx, a, b):
    return _f32x16(a, b), lambda context, builder, sig, args: builder.fsub(args[0], args[1])


@intrinsic
def _fsplat(typingctx, c):
    return _f32x16(types.float32), lambda context, builder, sig, args: _splat(builder, args[0], _VF)


def _float_load(vec):
    """An intrinsic loading the float vector `vec` (a _Vec) at an address."""
    def load(typingctx, a):
        def codegen(context, builder, sig, args):
            return builder.load(_ptr(builder, args[0], vec.llty), align=4)
        return vec(types.intp), codegen
    return intrinsic(load)


_fload, _f8load = _float_load(_f32x16), _float_load(_f32x8)


@intrinsic
def _fstore(typingctx, v, a):
    def codegen(context, builder, sig, args):
        builder.store(args[0], _ptr(builder, args[1], _VF), align=4)
        return context.get_dummy_value()
    return types.none(v, types.intp), codegen


@intrinsic
def _fsum(typingctx, v):
    """The sum of the lanes of a float vector (16 or 8 lanes)."""
    if not isinstance(v, _Vec) or not isinstance(v.llty.element, ir.FloatType):
        return None

    def codegen(context, builder, sig, args):
        vty = sig.args[0].llty
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, vty]),
                                            f"llvm.vector.reduce.fadd.v{vty.count}f32")
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=("reassoc",))
    return types.float32(v), codegen
