"""AVX2 without AVX-512: 256 msb weights at a time, codes by an 8x8 bit transpose across plane registers.

Byte k of a plane's 32 bytes holds bit j of weight 8k+j. Three delta-swap stages (shift, xor, and on
16-bit lanes; masks drop what crosses a byte) turn the b plane registers into 8 code registers: register
j holds the codes of weights 8k+j (k = 0..31), so the activations are read in that order (the caller's
strided copy of x). Plane p goes to bit W-1-p, so codes are q >> (8-W): at most 15 at W <= 4 (vpmaddubsw
with int8 activations cannot saturate), 255 at W = 8 (vpmaddwd with int16 activations). Bytes 0-15 of a
register are group g, 16-31 group g+1.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from edge_moe.kernels.cpu.simd.isa import _I8, _I16, _I64, _V8I, _V32, _call, _i32x8, _lanes, _ptr, _splat


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
