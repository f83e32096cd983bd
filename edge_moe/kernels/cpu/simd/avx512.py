"""AVX-512 with GFNI and VBMI: bit planes -> byte codes of 512 weights at once by byte shuffles and one
GF(2) affine per 64 weights, no mask register per plane (_codes512)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from edge_moe.kernels.cpu.simd.isa import _I8, _I32, _I64, _VB, _call, _splat, _u8x64


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
