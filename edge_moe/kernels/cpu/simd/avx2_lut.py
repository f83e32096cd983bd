"""AVX2 table lookups of the 2-bit LUT form (T-MAC): 16 rows x 128 inputs per call (_lut2_dot16)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from edge_moe.kernels.cpu.simd.isa import _I16, _I32, _I64, _V8I, _V32, _call, _i32x16, _lanes, _ptr

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
    form (to_lut_form: per step s of 16 inputs, 32 bytes per plane, byte 16 L + r holding row r's
    plane byte 2 s + L) with the int8 tables at t (_lut_tables: per step, TA then TB, 32 bytes
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
