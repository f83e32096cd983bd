"""SIMD values for the CPU kernels: LLVM vectors as numba types and the few operations they need.

Addresses are plain integers (intp) so that hot loops carry no array reference counting.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

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
    vpmaddwd per 128 (4 x 2 x 15 x 128 fits int16). Zen 3, one thread, in cache: 2.05-2.1 ns per 128
    against 2.4-2.8 for llama.cpp's Q4_0 order (a 16-byte load into both halves and a per-dword
    shift per 32 weights), whose vpmaddubsw and vpmaddwd share one port with the float FMA."""
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


def _half_to_float(builder, bits):
    """fp16 bits [16] -> float32 with integer ops (no F16C: LLVM would call __extendhfsf2, which the
    JIT does not link): the magnitude shifted into a float's fields is 2^-112 times the value,
    subnormals included; then the sign. fp16 scales and minima are finite."""
    i32 = ir.VectorType(_I32, 16)
    u = builder.zext(bits, i32)
    mag = builder.bitcast(builder.shl(builder.and_(u, _splat(builder, ir.Constant(_I32, 0x7FFF), i32)),
                                      _splat(builder, ir.Constant(_I32, 13), i32)), _VF)
    value = builder.bitcast(builder.fmul(mag, ir.Constant(_VF, [2.0 ** 112] * 16)), i32)
    sign = builder.shl(builder.and_(u, _splat(builder, ir.Constant(_I32, 0x8000), i32)),
                       _splat(builder, ir.Constant(_I32, 16), i32))
    return builder.bitcast(builder.or_(value, sign), _VF)


def _load_halves(builder, a, n):
    """The first n (1..16) 16-bit values at address a, zeros after. Without AVX-512 LLVM turns a
    16-bit masked load into 16 branches (~100 instructions per call; _coefs made the nibble-form
    rows 1.9x slower), so there it is a 32-bit masked load (vpmaskmovd) of the n // 2 whole pairs
    and one plain load of value n - 1, always in range, blended into lane n - 1."""
    if _BYTE_MASKS:
        lanes = ir.Constant(ir.VectorType(_I64, 16), list(range(16)))
        mask = builder.icmp_signed("<", lanes, _splat(builder, n, ir.VectorType(_I64, 16)))
        return _call(builder, "llvm.masked.load.v16f16.p0", _VH,
                     [_ptr(builder, a, _VH), ir.Constant(_I32, 2), mask, ir.Constant(_VH, [0.0] * 16)])
    v8, v16 = ir.VectorType(_I32, 8), ir.VectorType(_I16, 16)
    lanes = ir.Constant(ir.VectorType(_I64, 8), list(range(8)))
    pairs = builder.ashr(n, ir.Constant(_I64, 1))
    mask = builder.icmp_signed("<", lanes, _splat(builder, pairs, ir.VectorType(_I64, 8)))
    words = _call(builder, "llvm.masked.load.v8i32.p0", v8,
                  [_ptr(builder, a, v8), ir.Constant(_I32, 2), mask, ir.Constant(v8, [0] * 8)])
    h = builder.bitcast(words, v16)
    last = builder.sub(n, ir.Constant(_I64, 1))
    tail = builder.load(builder.inttoptr(builder.add(a, builder.shl(last, ir.Constant(_I64, 1))),
                                         _I16.as_pointer()), align=2)
    at = builder.icmp_signed("==", ir.Constant(v16, list(range(16))),
                             _splat(builder, builder.trunc(last, _I16), v16))
    h = builder.select(at, _splat(builder, tail, v16), h)  # insertelement at a variable lane goes
    return builder.bitcast(h, _VH)  # through the stack: a store-forwarding stall, ~35 cycles per call


@intrinsic
def _h2f(typingctx, a, n):
    """The first n (1..16) fp16 values at address a as floats, zeros after (_load_halves: nothing past
    them is read)."""
    def codegen(context, builder, sig, args):
        a, n = args
        h = _load_halves(builder, a, n)
        if _F16C:
            return builder.fpext(h, _VF)
        return _half_to_float(builder, builder.bitcast(h, ir.VectorType(_I16, 16)))
    return _f32x16(types.intp, types.intp), codegen


@intrinsic
def _h2f16(typingctx, a):
    """The 16 fp16 values at address a as floats (_h2f without its masks)."""
    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(builder, args[0], _VH), align=2)
        if _F16C:
            return builder.fpext(h, _VF)
        return _half_to_float(builder, builder.bitcast(h, ir.VectorType(_I16, 16)))
    return _f32x16(types.intp), codegen


@intrinsic
def _prefetch(typingctx, a):
    """Hint the cache line at address a into the cache hierarchy (no fault if a is out of range)."""
    def codegen(context, builder, sig, args):
        p = builder.inttoptr(args[0], _I8.as_pointer())
        _call(builder, "llvm.prefetch.p0", ir.VoidType(),
              [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(types.intp), codegen


# ---------------------------------------------------------------------------------------------
# Bit planes -> byte codes for 512 weights at once (GFNI + VBMI): no mask register per plane.

def _pair_labels(planes, chunks):
    """Contents of a register holding `planes` x `chunks`: byte (chunk, octet m, plane) order."""
    return [(p, 8 * c + m) for c in chunks for m in range(8) for p in planes]


def _combine(builder, a, b, target, zero=()):
    """One two-source byte shuffle: registers (value, labels) -> value with `target` labels; labels in
    `zero` are taken from b, a zero register."""
    (va, la), (vb, lb) = a, b
    where = {lab: i for i, lab in enumerate(la)}
    where.update({lab: 64 + i for i, lab in enumerate(lb) if lab is not None and lab not in where})
    idx = [64 if t in zero else where[t] for t in target]
    return builder.shuffle_vector(va, vb, ir.Constant(ir.VectorType(_I32, 64), idx)), list(target)


def _merge(builder, ga, gb, nplanes):
    """Two groups of plane registers -> one of `nplanes` planes, 8 / nplanes chunks per register."""
    per = 8 // nplanes
    planes = sorted({p for _, lab in ga + gb for p, _ in lab})
    return [_combine(builder, ga[r // 2], gb[r // 2], _pair_labels(planes, range(r * per, r * per + per)))
            for r in range(nplanes)]


def _transpose512(builder, planes, width):
    """R_c (c = 0..7): qword m of R_c = byte 8c+m of planes 0..7, zero for planes >= width.

    Plane registers merge pairwise until one group holds all `width` planes; below 8 planes the last
    shuffle takes its second source from a zero register (a zeroing shuffle, no extra instruction)."""
    groups = [[(v, _pair_labels([p], range(8)))] for p, v in enumerate(planes[:width])]
    n = 1
    while len(groups) > (2 if width == 8 else 1):
        n *= 2
        groups = [_merge(builder, groups[i], groups[i + 1], n) for i in range(0, len(groups), 2)]
    ga = groups[0]
    gb = groups[1] if width == 8 else [(ir.Constant(_VB, [0] * 64), [None] * 64)] * n
    zero = {(p, i) for p in range(width, 8) for i in range(64)}
    return [_combine(builder, ga[c * n // 8], gb[c * n // 8], _pair_labels(range(8), [c]), zero)[0]
            for c in range(8)]


_CODES = types.UniTuple(_u8x64, 8)


@intrinsic
def _codes512(typingctx, width, bits, q0, q1, q2, q3, q4, q5, q6, q7):
    """Byte codes sum_p 2^(7-p) bit_p (p < bits) of 512 weights from 64 bytes of each of the first
    `width` planes (a literal, 2, 4 or 8; planes at or above bits may hold anything): 8 registers of
    64 codes. Byte shuffles gather the planes' bytes of each 8 weights into one qword, one GF(2)
    affine per register transposes the 8x8 bits, and an AND drops the bits of planes >= bits."""
    if not isinstance(width, types.IntegerLiteral) or width.literal_value not in (2, 4, 8):
        return None

    def codegen(context, builder, sig, args):
        width = sig.args[0].literal_value
        regs = _transpose512(builder, list(args[2:]), width)
        unit = ir.Constant(_VB, [1 << (i % 8) for i in range(64)])
        out = [_call(builder, "llvm.x86.vgf2p8affineqb.512", _VB, [unit, r, ir.Constant(_I8, 0)]) for r in regs]
        if width > 2:  # width 2 holds only bits = 2: the shuffles already zeroed every other plane
            keep = _splat(builder, builder.trunc(builder.lshr(ir.Constant(_I64, 0xFF00), args[1]), _I8), _VB)
            out = [builder.and_(q, keep) for q in out]
        return context.make_tuple(builder, sig.return_type, out)
    return _CODES(width, types.intp, q0, q1, q2, q3, q4, q5, q6, q7), codegen


# ---------------------------------------------------------------------------------------------
# AVX2 (no AVX-512): 256 weights at a time, codes by an 8x8 bit transpose across plane registers.
#
# Byte k of a plane's 32 bytes holds bit j of weight 8k+j. Three delta-swap stages (shift, xor, and
# on 16-bit lanes; masks drop what crosses a byte) turn the b plane registers into 8 code registers:
# register j holds the codes of weights 8k+j (k = 0..31), so the activations are read in that
# order (the caller's strided copy of x). Plane p goes to bit W-1-p, so codes are q >> (8-W): at most
# 15 at W <= 4 (vpmaddubsw with int8 activations cannot saturate), 255 at W = 8 (vpmaddwd with int16
# activations). Bytes 0-15 of a register are group g, 16-31 group g+1.

def _load32(builder, a, nbytes):
    """32 bytes at address a, or 16 and zeros (nbytes 16: nothing past them is read)."""
    if nbytes == 32:
        return builder.load(_ptr(builder, a, _V32), align=1)
    low = builder.load(_ptr(builder, a, ir.VectorType(_I8, 16)), align=1)
    return builder.shuffle_vector(low, ir.Constant(ir.VectorType(_I8, 16), [0] * 16), _lanes(32))


def _bytes_splat(v):
    return ir.Constant(_V32, [v & 0xFF] * 32)


def _delta_swap(builder, regs, i, s):
    """Swap bit c+s of register i with bit c of register i+s, in every byte, for c with c & s = 0.
    None is an all-zero register (its operations are left out)."""
    a, b = regs[i], regs[i + s]
    if a is None and b is None:
        return
    low = sum(1 << c for c in range(8) if not c & s)
    m = _bytes_splat(low)
    shift = _bytes_splat(s)
    if b is None:  # t = (a >> s) & m; b = t; a ^= t << s clears the bits t took
        t = builder.and_(builder.lshr(a, shift), m)
        regs[i + s], regs[i] = t, builder.and_(a, _bytes_splat(~(low << s)))
        return
    if a is None:  # t = b & m; b ^= t (b keeps its high bits); a = t << s
        t = builder.and_(b, m)
        regs[i], regs[i + s] = builder.shl(t, shift), builder.and_(b, _bytes_splat(~low))
        return
    t = builder.and_(builder.xor(builder.lshr(a, shift), b), m)
    regs[i + s], regs[i] = builder.xor(b, t), builder.xor(a, builder.shl(t, shift))


def _codes256(builder, width, bits, a, planes, nbytes, kept=2):
    """8 code registers (see above) of the 256 weights at offset a of the planes; planes at or above
    bits are masked to zero (planes below `kept` are always there)."""
    regs = [None] * 8
    for p in range(width):
        v = _load32(builder, builder.add(planes[p], a), nbytes)
        if p >= kept:  # width 4 holds bits 3-4, width 8 bits 5-8: drop planes >= bits
            keep = builder.select(builder.icmp_signed(">", bits, ir.Constant(_I64, p)),
                                  ir.Constant(_I8, 0xFF), ir.Constant(_I8, 0))
            v = builder.and_(v, _splat(builder, keep, _V32))
        regs[width - 1 - p] = v
    for s in (4, 2, 1):
        for i in range(8):
            if not i & s:
                _delta_swap(builder, regs, i, s)
    return [r if r is not None else ir.Constant(_V32, [0] * 32) for r in regs]


def _dot_int8(builder, codes, xb):
    """Lanes 0-3: group g, 4-7: group g+1 of sum codes * x8 (32 int8 per register at xb + 32 j)."""
    acc = None
    for j, q in enumerate(codes):
        x = builder.load(_ptr(builder, builder.add(xb, ir.Constant(_I64, 32 * j)), _V32), align=1)
        d = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_I16, 16), [q, x])
        acc = d if acc is None else builder.add(acc, d)
    ones = ir.Constant(ir.VectorType(_I16, 16), [1] * 16)
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [acc, ones])


def _dot_int16(builder, codes, xb):
    """As _dot_int8 with int16 activations (16 per half register at xb + 64 j and + 32)."""
    v16 = ir.VectorType(_I16, 16)
    acc = [None, None]
    for j, q in enumerate(codes):
        for h in range(2):
            qh = builder.zext(builder.shuffle_vector(q, q, _lanes(16, 16 * h)), v16)
            x = builder.load(_ptr(builder, builder.add(xb, ir.Constant(_I64, 64 * j + 32 * h)), v16), align=2)
            d = _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [qh, x])
            acc[h] = d if acc[h] is None else builder.add(acc[h], d)
    folded = [builder.add(builder.shuffle_vector(v, v, _lanes(4)), builder.shuffle_vector(v, v, _lanes(4, 4)))
              for v in acc]
    return builder.shuffle_vector(folded[0], folded[1], _lanes(8))


@intrinsic
def _dot256(typingctx, width, nbytes, bits, a, xb, p0, p1, p2, p3, p4, p5, p6, p7):
    """Integer dots of two groups (one if nbytes is 16) of msb codes at width W (2, 4: int8 x8 at xb;
    8: int16 x at xb) with the strided activations: i32 lanes 0-3 group g, 4-7 group g+1; in units
    of 2^(8-W) times the msb code's."""
    for lit in (width, nbytes):
        if not isinstance(lit, types.IntegerLiteral):
            return None
    if width.literal_value not in (2, 4, 8) or nbytes.literal_value not in (16, 32):
        return None

    def codegen(context, builder, sig, args):
        w, n = sig.args[0].literal_value, sig.args[1].literal_value
        codes = _codes256(builder, w, args[2], args[3], list(args[5:]), n)
        return (_dot_int8 if w <= 4 else _dot_int16)(builder, codes, args[4])
    return _i32x8(width, nbytes, types.intp, types.intp, types.intp, *([types.intp] * 8)), codegen


@intrinsic
def _dot256_low(typingctx, nbytes, bits, a, xb, p4, p5, p6, p7):
    """_dot256 of the low codes sum_p 2^(7-p) bit_p over planes 4..3+bits (bits = 1..4, planes p4..p7)
    with the strided int16 activations at xb: the part of 5-8 bit codes below their top nibble."""
    if not isinstance(nbytes, types.IntegerLiteral) or nbytes.literal_value not in (16, 32):
        return None

    def codegen(context, builder, sig, args):
        codes = _codes256(builder, 4, args[1], args[2], list(args[4:]), sig.args[0].literal_value, kept=1)
        return _dot_int16(builder, codes, args[3])
    return _i32x8(nbytes, types.intp, types.intp, types.intp, *([types.intp] * 4)), codegen


@intrinsic
def _f8zero(typingctx):
    return _f32x8(), lambda context, builder, sig, args: ir.Constant(_V8F, [0.0] * 8)


@intrinsic
def _i8zero(typingctx):
    return _i32x8(), lambda context, builder, sig, args: ir.Constant(_V8I, [0] * 8)


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


_V16H = ir.VectorType(_I16, 16)
_UNPACK_LO = ir.Constant(ir.VectorType(_I32, 32), [v for base in (0, 16) for i in range(base, base + 8)
                                                    for v in (i, 32 + i)])  # vpunpcklbw
_UNPACK_HI = ir.Constant(ir.VectorType(_I32, 32), [v for base in (8, 24) for i in range(base, base + 8)
                                                    for v in (i, 32 + i)])  # vpunpckhbw


def _lane_sum_i32(builder, v):
    """The two 128-bit lanes of int16 x 16 v added: int32 x 8."""
    halves = [builder.shuffle_vector(v, v, _lanes(8, k)) for k in (0, 8)]
    return builder.sext(builder.add(*halves), _V8I)


@intrinsic
def _lut2_dot16(typingctx, q0, q1, t):
    """The int32 dots of one group of 128 inputs for 16 rows of 2-bit msb codes 2 b0 + b1 held in LUT
    form (cpu.to_lut_form: per step s of 16 inputs, 32 bytes per plane, byte 16 L + r holding row r's
    plane byte 2 s + L) with the int8 tables at t (cpu._lut_tables: per step, TA then TB, 32 bytes
    each, lane L of TA / TB the 16 subset sums of inputs 16 s + 8 L + 0..3 / 4..7). Per step: 2 plane
    loads, 4 vpshufb, 4 unpacks and 4 vpmaddubsw with (2, 1) that give 2 L0 + L1 per row in int16, 2
    adds (T-MAC's lookup: 4 weight bits per table byte, no multiply per weight)."""
    def codegen(context, builder, sig, args):
        q0, q1, t = args
        low, w21 = ir.Constant(_V32, [15] * 32), ir.Constant(_V32, [2, 1] * 16)

        def load(a, off):
            return builder.load(_ptr(builder, builder.add(a, ir.Constant(_I64, off)), _V32), align=1)

        def look(table, ix):
            return _call(builder, "llvm.x86.avx2.pshuf.b", _V32, [table, ix])

        def high(v):
            return builder.and_(builder.bitcast(builder.lshr(builder.bitcast(v, _V16H),
                                                             ir.Constant(_V16H, [4] * 16)), _V32), low)

        def pairs(a, b, order):  # bytes (a_i, b_i) side by side -> 2 a_i + b_i in int16
            both = builder.shuffle_vector(a, b, order)
            return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16H, [w21, both])
        rows = [None, None]  # int16 sums of rows 0-7 and 8-15 (each per lane)
        for s in range(8):
            p0, p1, ta, tb = load(q0, 32 * s), load(q1, 32 * s), load(t, 64 * s), load(t, 64 * s + 32)
            a0, a1 = look(ta, builder.and_(p0, low)), look(ta, builder.and_(p1, low))
            b0, b1 = look(tb, high(p0)), look(tb, high(p1))
            for k, order in enumerate((_UNPACK_LO, _UNPACK_HI)):
                d = builder.add(pairs(a0, a1, order), pairs(b0, b1, order))
                rows[k] = d if rows[k] is None else builder.add(rows[k], d)
        return builder.shuffle_vector(*(_lane_sum_i32(builder, v) for v in rows), _lanes(16))
    return _i32x16(types.intp, types.intp, types.intp), codegen


@intrinsic
def _fma16(typingctx, acc, v, c):
    """acc + float(v) * c lane-wise (v int32 x 16, c float x 16)."""
    def codegen(context, builder, sig, args):
        acc, v, c = args
        return _call(builder, "llvm.fma.v16f32", _VF, [builder.sitofp(v, _VF), c, acc])
    return _f32x16(acc, v, c), codegen
