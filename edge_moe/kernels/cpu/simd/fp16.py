"""fp16 row metadata (scales, minima) as float vectors: F16C where the target has it, integer ops else."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from edge_moe.kernels.cpu.simd.isa import (
    _BYTE_MASKS,
    _F16C,
    _I16,
    _I32,
    _I64,
    _VF,
    _VH,
    _call,
    _f32x16,
    _ptr,
    _splat,
)


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
    16-bit masked load into 16 branches (about 100 instructions per call), so there it is a 32-bit
    masked load (vpmaskmovd) of the n // 2 whole pairs and one plain load of value n - 1, always in
    range, blended into lane n - 1."""
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
    return builder.bitcast(h, _VH)  # through the stack: a store-forwarding stall per call


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
