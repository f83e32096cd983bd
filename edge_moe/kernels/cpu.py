"""CPU backend (numba): nested bit-plane matmuls and the fused MoE FFN; same ops as `reference`.

How a row is computed (y[o] = sum_g c[o,g] * q[o,g,:] . x_g + offset[o,g] * sum(x_g), DESIGN.md 1):
- Activations become two signed 8-bit digits per input, x ~ d_g * (256 h + l) with one scale d_g per
  group (int16 precision: error <= max|x_g| / 65024 per input); the offsets use exact float sums.
- Against weights of at most ACT8_MAX_BITS (4) bits the dots take the high digit only: x ~ 256 d_g h
  is x quantized to int8 per group (llama.cpp's Q8 activations, block 128; error <= max|x_g| / 254),
  and the offsets take the sums of those values, so the kernels compute W_b . q8(x) exactly. Half the
  dot products: GEMVs 8-15% faster at 2-4 bits. Held-out perplexity of the demo model
  (tools/eval_quality.py, int8 vs int16 activations): +0.02% / +0.09% / +0.14% at 4 / 3 / 2 bits
  (msb; mwq +0.07 / +0.10 / +0.12%), against +1.7% / +9.2% / +59% from the weights themselves. 5 bits
  and up keep int16 (their own loss, +0.6% at 5 bits, is too close) and the 8-bit forward stays
  within 1e-4 of transformers on the same weights.
- Byte codes: msb q = sum_p 2^(7-p) bit_p, so w = s q + offset; mwq q = 128 b0 + 64 b1 for the base
  and q = 128 bit_p for each sign plane, each with its own coefficient. Then q.h and q.l with
  vpdpbusd (VNNI) and one int32 -> float flush per group. The dequantized matrix is never formed.
- GEMV, msb at group 128 (the default format), where the CPU has GFNI + VBMI: codes of 512 weights
  at a time. One 64-byte load per plane, byte shuffles (vpermt2b/w/d) that put the plane bytes of
  every 8 weights into one qword, then one vgf2p8affineqb per 64 weights transposes those 8x8 bits
  into 8 byte codes; an AND drops planes above the width. Widths 2 / 3-4 / 5-8 are compiled as three
  shuffle networks (7 straight-line instances compiled 2.5x slower for ~8% speed). Plane rows are
  prefetched 2 KB ahead. Every other case (mwq, other groups, no GFNI): each plane's 64-bit word is
  an AVX-512 byte mask added into q (b x kmovq + masked vpaddb per 64 weights).
- GEMV, msb at group 128, on AVX2 without AVX-512 (simd.STRIDED): 256 weights per step. An 8x8 bit
  transpose across the plane registers (three shift/xor/and stages on 16-bit lanes) gives 8 code
  registers, register j holding weights 8k+j; the activations are copied once per call into that
  strided order. Codes are q >> (8 - W) for width classes W = 2, 4, 8, so vpmaddubsw with int8
  activations cannot saturate (W <= 4); W = 8 takes vpmaddwd with int16 ones. Zen 3, one thread,
  4096x4096 with weights in cache: 5.1 / 6.6 / 14 ns per group of 128 at 2 / 4 / 8 bits (about
  47 instructions per group at 4 bits, compute-bound: with 2 threads a Mixtral-size matrix reads
  at about a third of DRAM bandwidth). Before it, byte masks by vpshufb + compare took 1.3-2x as
  long, and LLVM's own lowering of the generic forms another 2-7x.
- Dense matrices at 8 bits are byte codes (model.packed.ByteLinear): byte_matmul zero-extends them
  and dots them with int16 activations (vpmaddwd), no transposition. At 4 bits they are nibbles
  (NibbleLinear; format.nested.to_nibbles: per 64 weights, byte j holds weights j and j + 32): per 64
  weights one 32-byte load, a shift, two ANDs and two vpmaddubsw with the int8 activations in weight
  order. llama.cpp's Q4_0 order (blocks of 32) took a 16-byte load into both register halves and
  a per-dword shift per 32 weights: 2.4-2.8 ns per group of 128 against 2.05-2.1 (Zen 3, one thread,
  in cache), and a layer call 1.1-1.15x as long (below).
- Resident msb experts on AVX2 (nibble_form, to_nibble_form): the runtime rewrites an expert it runs at
  3-4 bits, once, in place: per 4 rows, the bytes of planes 0-3 become the rows' nibble codes (the
  top 4 bits, in to_nibbles' order), as the dense part's; planes 4.. stay. At <= 4 bits the GEMV dots
  nibbles (masked to the top bits below 4); above 4 it adds the low codes of planes 4.. (a 4-plane
  transpose, _dot256_low) with int16 activations. Zen 3, one thread, 2048x2048 in cache, in Q4_0
  order: 3.5 ns per group of 128 against 5.9 for the 4-bit planes and 3.9 for 2-bit planes. The
  order of 64 with the row's offsets summed in vector lanes and its prefetches inside the group loop
  took an OLMoE layer call (8 experts, 4 bits, from DRAM, 2 threads) 0.86-0.90x as long (medians of
  8-12 interleaved rounds).
  At 8 bits the added nibble dots made it slower than the planes (decode 33 -> 37.5 ms per token), so
  only experts run at 3-4 bits are rewritten (runtime.moe.NIBBLE_BITS).
- Experts at 2 bits on AVX2 (lut_form, to_lut_form): T-MAC's table lookups. Per token and group of 128
  inputs, 32 int8 tables of the 16 subset sums of every 4 int8 activations (_lut_tables; requantized per
  group by st = max|sum| / 127 where that passes 127); the expert is rewritten once so that per block
  of 16 rows one 32-byte load holds a plane's bits of 16 inputs for all 16 rows, and its scales and
  minima lie 16 rows side by side. Then per 16 rows, 16 inputs and both planes: 2 loads, 4 vpshufb
  lookups, 4 unpacks and 4 vpmaddubsw with (2, 1) (code 2 b0 + b1), 2 adds; coefficients and offsets
  in 16-lane vectors. No multiply per weight, so 2 bits finally cost less compute than 4: Zen 3, two
  threads, from DRAM, against 4-bit nibble form in the same run: Mixtral 14336x4096 551 against
  1090 us (0.51x, 91% of read bandwidth), OLMoE layer (8 experts) 0.54 against 1.04 ms (0.52x),
  OLMoE 2048x1024 alone 44 against 69 us (0.63x); the plane kernel at 2 bits took 0.89-0.99x of the
  4-bit nibble time. The tables cost held-out perplexity nothing measurable on the demo model at 2
  bits (20.036 against 20.049 with int8 activations, 20.066 with float32 ones). The runtime puts
  resident experts run only at 2 bits into this form (runtime.moe, bookkeeping.wanted_form).
- Row metadata (fp16 scales and minima, _coefs) comes in by simd._h2f. Before it avoided LLVM's
  lowering of a 16-bit masked load on AVX2 (16 branches per call), rows took 6.3 / 9.3 / 7.1 ns per
  group (nibble form, 4-bit and 2-bit planes) where they now take 3.5 / 5.9 / 3.9.
- T > 1 (prefill chunks, several tokens on one expert): the codes of a group are built once into L1
  (mask adds) and reused by every token, 4 tokens per pass. Experts in nibble form at <= 4 bits
  instead run the GEMV once per token over blocks of rows that stay in L2 (PASS_BYTES): the nibbles
  need no building, and that GEMV's loop beat this one 1.6-2.3x. msb planes at group 128 and <= 4
  bits on AVX2 are first written as nibbles of such a block in scratch (_nibble_rows), then the same:
  OLMoE 2048x1024, T = 4 / 64, 2 bits 0.41 / 2.37 ms against 0.49 / 4.18, 4 bits 0.56 / 3.50 against
  0.59 / 5.47 (with the plane addresses reloaded per word, as first written, T = 4 at 4 bits took
  0.61 ms against 0.55). That GEMV takes 4 tokens at once (_gemv_nibble4: a group's nibbles loaded
  and unpacked once for 4 dots): OLMoE 2048x1024 nibble form at T = 4 / 8 / 32 0.17 / 0.27 / 0.73 ms
  against 0.25 / 0.42 / 1.21 one token at a time, a T = 64 layer 43-46 against 58-65 ms, and
  olmoe-4l prefill of 64 tokens at 4:4 213 against 171 tok/s (medians of 10 interleaved rounds).
  The dense part's nibble codes (NibbleLinear) do the same (_nibble_row4): 2048x2048 at T = 4 / 64
  0.27 / 4.44 ms against 0.36 / 5.69.
  `moe_ffn` runs all active experts of a layer in one numba call with two parallel loops, one share
  per thread: a contiguous part of the gate_up rows of every expert, then of the down rows (each
  thread owns its output rows, so no atomics); expert_ffn and expert_ffn_units are that call with
  one expert. On AVX2 the codes of <= 4 bits are built as q >> (8 - b) and dotted with
  vpmaddubsw, wider ones with the int16 activations and vpmaddwd.
Measured on the 2-core AVX-512 Xeon of issue 3 (cycles per group of 128 weights, one thread, N = 4096,
weights in L2, at 2 / 4 / 8 bits; DRAM-resident timings: tools/bench_kernels.py):
- shuffle network: 9.6 / 11.8 / 17.1. Port 0 (vpdpbusd, vgf2p8affineqb, the flush) is the limit:
  4 dots of the two digits per group cost the same at every width, so 2 bits is not much cheaper.
- mask adds: 12.9 / 12.4 / 19.3 (kmovq and vpaddb are 2 port-0/5 uops per plane per 64 weights).
- one int8 digit (int8 activations, used at <= 4 bits): 2 bits 9.2 -> 8.0 (4096x14336, weights in
  the LLC).
- three digits (24-bit activations, fp32-exact): ~2-3 cycles more per group.
- float masked FMA per plane (kmovw + vfmadd231ps{k}, exact fp32): >= 32 cycles per group at 4 bits.
  Plain numba unpack-then-FMA loops (the issue's probe): 8-22% of bandwidth.
- software prefetch: 25-45% slower with mask adds at 4-8 bits (ports were full); with the shuffle
  network it turned a 2-bit 1024x4096 GEMV from 131 to ~80-95 us (2 threads, DRAM) and is neutral at
  4-8 bits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from numba import get_num_threads, njit, prange  # get_num_threads: in Python (a global numba cannot cache)

from edge_moe.errors import UsageError
from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import BASE_BITS, MAX_BITS, num_groups
from edge_moe.kernels.simd import (
    GFNI,
    STRIDED,
    _addr,
    _codes512,
    _dot256,
    _dot256_low,
    _dot_bytes,
    _dot_nib128,
    _dot_nibbles,
    _dpbusd,
    _f8add,
    _f8load,
    _f8zero,
    _fload,
    _fma8,
    _fma16,
    _fma_pair,
    _fma_s,
    _fma_v,
    _fmul,
    _fone,
    _fsplat,
    _fstore,
    _fsub,
    _fsum,
    _fzero,
    _h2f,
    _h2f16,
    _i2f,
    _i8zero,
    _izero,
    _join_digits,
    _ldb,
    _ldf,
    _ldi,
    _lut2_dot16,
    _nib_codes64,
    _prefetch,
    _qload,
    _qload_n,
    _qmask_add,
    _qstore,
    _qzero,
)

XDIGIT_MAX = 127 * 256  # |x / d| bound: both balanced base-256 digits fit in int8, and the high
# digit alone is x quantized to int8 with scale max|x_g| / 127
MAX_GROUP = 4096  # (h << 8) + l of one group must fit in int32: 64 words * 130560 * 256 < 2^31
PASS_BYTES = 128 * 1024  # several tokens on an expert in nibble form at <= 4 bits: one GEMV per token
# over each block of rows whose nibbles take this many bytes, which stay in L2 for the next token's
# (Zen 3, OLMoE 2048x1024 at 4 bits: T = 8 / 64 in 0.38 / 2.88 ms against _gemm's 0.70 / 4.71; an
# OLMoE layer of 64 tokens in 65 ms against 150)
ROWS_PER_ITEM = 256  # output rows per parallel work item (64 -> 256: OLMoE nibble-form layer call 0.90x)
PREFETCH_BYTES = 2048  # how far ahead in each plane a GEMV row asks for its next rows
DIGIT_PAD = 3 * 128  # readable bytes after the digits: a last 512-input block's missing groups
NOGF = False
ACT8_MAX_BITS = 4  # at <= this many bits the dots use only the high digit: int8 activations (Q8)
HIGH_UNIT, ONE_UNIT = np.float32(256.0), np.float32(1.0)  # weights of the high and low digits
PLANE_FORM, NIBBLE_FORM, LUT_FORM = 0, 1, 2  # how an expert's chunks hold it: as written; rewritten by
# to_nibble_form; rewritten by to_lut_form (the kernels' `form`, one per expert)
LUT_ROWS = 16  # rows per block of the LUT form

_POWERS = np.repeat((128 >> np.arange(MAX_BITS)).astype(np.uint8)[:, None], 64, axis=1)  # [8, 64]
# [b, p]: plane p's weight in codes q >> (8 - b) (the AVX2 GEMM's, <= 15 at b <= 4), 0 for p >= b
_LOW_POWERS = np.array([[[(1 << (b - 1 - p)) if p < b else 0] * 64 for p in range(MAX_BITS)]
                        for b in range(MAX_BITS + 1)], np.uint8)


# ---------------------------------------------------------------------------------------------
# Activations -> int16 digits.

@njit(cache=True)
def _digit_row(x, G, ng, dig, scale, sums):
    """One row x [N] -> digits [2, ng*G] int8 (high, low), scale d [ng], sums [2, ng]: of x_g and
    of its int8 form 256 d h_g (which the high-digit-only dots use, so that they compute W . q8(x))."""
    N = x.shape[0]
    top_bits = scale.view(np.int32)
    for g in range(ng):  # per-group slices: numba vectorizes these loops, not ones over lo..hi of x
        lo, hi = g * G, min(N, g * G + G)
        top_bits[g], sums[0, g] = _top_and_sum(x[lo:hi])  # scale[g] = max|x_g|
        if scale[g] != 0:
            scale[g] /= np.float32(XDIGIT_MAX)
            high = _group_digits(x[lo:hi], np.float32(1.0) / scale[g], dig[0, lo:hi], dig[1, lo:hi])
            sums[1, g] = HIGH_UNIT * scale[g] * np.float32(high)


@njit(fastmath={"reassoc"})
def _top_and_sum(x):
    """(the bits of max|x| as int32, sum(x)): the max is taken on the float bits as integers with the
    sign cleared, as numba's float max does not vectorize."""
    bits = x.view(np.int32)
    top = np.int32(0)
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        top = max(top, bits[i] & 0x7FFFFFFF)
        s += x[i]
    return top, s


@njit(inline='always')
def _group_digits(x, inv, high, low):
    """Balanced base-256 digits of rint(x * inv): x * inv ~ 256 high + low, both int8; sum(high)."""
    total = 0
    for i in range(x.shape[0]):
        xi = np.int32(np.rint(x[i] * inv))
        li = ((xi + 128) & 255) - 128
        hi = (xi - li) >> 8
        high[i] = hi
        low[i] = li
        total += hi
    return total


@njit(cache=True, parallel=True, nogil=True)
def _digits_of(x, md):
    """Digits, scales and sums (_digit_arrays) of every row of x; in parallel only when there are
    enough rows to pay for waking the other thread (~1.4 us here)."""
    T = x.shape[0]
    dig, dsc, dsum = _digit_arrays(T, md)
    if T < 8:
        for t in range(T):
            _digit_row(x[t], md[2], md[3], dig[t], dsc[t], dsum[t])
    else:
        for t in prange(T):
            _digit_row(x[t], md[2], md[3], dig[t], dsc[t], dsum[t])
    return dig, dsc, dsum


@njit(cache=True)
def _digit_arrays(R, md):
    """Zeroed digits [R, 2, ng*G], scales [R, ngp], sums [R, 2, ngp] for inputs of matrix md; the digits
    are followed by DIGIT_PAD readable bytes (a last 512-input block reads up to 3 groups past)."""
    size = R * 2 * md[3] * md[2]
    dig = np.zeros(size + DIGIT_PAD, np.int8)[:size].reshape((R, 2, md[3] * md[2]))
    return dig, np.zeros((R, md[4]), np.float32), np.zeros((R, 2, md[4]), np.float32)


@njit(cache=True)
def _avx2_inputs(dig, dsc, md, gemm, strided=True, lut=False):
    """The AVX2 kernels' forms of the digits (empty where those kernels are not compiled): the GEMV's
    strided ones (_strided_digits; empty unless strided: no plane GEMV and no 5-8 bit nibble GEMV
    reads them), if gemm the GEMM's int16 inputs in order (_int16_inputs), and if lut the LUT form's
    tables and their scales (_lut_tables)."""
    x8, x16 = _strided_digits(dig, md, strided)
    tab, tsc = _lut_tables(dig, dsc, md, STRIDED and lut)
    return (x8, x16, _int16_inputs(dig) if STRIDED and gemm else np.zeros((dig.shape[0], 0), np.int16),
            tab, tsc)


@njit(cache=True)
def _lut_tables(dig, dsc, md, wanted):
    """Per row of digits [R, 2, ng*G] (group 128): int8 tables [R, ng*512] of the 16 subset sums of the
    high digits of every 4 inputs (_lut2_dot16's order), each group's requantized by st = max|sum| / 127
    where that passes 127 (T-MAC's int8 tables: error <= st / 2 per sum of 4), and the scales d_g st
    [R, ngp] the coefficients then take (empty unless wanted)."""
    R, ng = dig.shape[0], md[3] if wanted else 0
    tab, tsc = np.zeros((R, ng * 512), np.int8), np.zeros((R, md[4] if wanted else 0), np.float32)
    sums = np.empty(512, np.int32)
    for r in range(R):
        for g in range(ng):
            _lut_sums(dig[r, 0, 128 * g:128 * g + 128], sums)
            top = np.int32(0)
            for j in range(512):
                top = max(top, abs(sums[j]))
            st = max(np.float32(1.0), np.float32(top) / np.float32(127.0))
            inv = np.float32(1.0) / st
            out = tab[r, 512 * g:512 * g + 512]
            for j in range(512):
                out[j] = np.int8(np.rint(np.float32(sums[j]) * inv))
            tsc[r, g] = dsc[r, g] * st
    return tab, tsc


@njit(inline='always')
def _lut_sums(h, sums):
    """The 16 subset sums of every 4 of the 128 int8 h, table k (16 k ..) of inputs 16 (k // 4) +
    8 (k & 1) + 4 ((k >> 1) & 1) + 0..3 (_lut2_dot16's TA / TB lanes)."""
    for k in range(32):
        i = 16 * (k // 4) + 8 * (k & 1) + 4 * ((k >> 1) & 1)
        a, b, c, d = np.int32(h[i]), np.int32(h[i + 1]), np.int32(h[i + 2]), np.int32(h[i + 3])
        for e in range(16):
            sums[16 * k + e] = (e & 1) * a + ((e >> 1) & 1) * b + ((e >> 2) & 1) * c + (e >> 3) * d


@njit(cache=True)
def _strided_digits(dig, md, wanted):
    """The digits in the order the AVX2 GEMV reads them (simd._dot256): per block of 256 inputs, 8
    runs of 32 holding inputs 8k+j (j = run): high digits as int8 and 256 high + low as int16
    [R, 256 * blocks] each, zero past the row."""
    R, n = dig.shape[0], md[3] * md[2]
    nblk = (md[3] + 1) // 2 if STRIDED and md[2] == 128 and wanted else 0
    x8, x16 = np.zeros((R, 256 * nblk), np.int8), np.zeros((R, 256 * nblk), np.int16)
    for r in range(R):
        for k in range(nblk):
            for j in range(8):
                for b in range(32):
                    i = 256 * k + 8 * b + j
                    if i < n:
                        x8[r, 256 * k + 32 * j + b] = dig[r, 0, i]
                        x16[r, 256 * k + 32 * j + b] = np.int16(dig[r, 0, i]) * 256 + dig[r, 1, i]
    return x8, x16


# ---------------------------------------------------------------------------------------------
# Row kernels. md (matrix descriptor, int64): O, N, G, ng, ngp, row_bytes, plane_off, meta_off.
# ca (int64 [8]): address of each chunk of the expert; plane p of a matrix lives in chunk p, its
# scales in chunk 0, minimums in chunk 1, mwq residual scales of plane p in chunk p.

@njit(inline='always')
def _qbuild(a, bits, p0, p1, p2, p3, p4, p5, p6, p7, w0, w1, w2, w3, w4, w5, w6, w7):
    """Byte codes sum_p 2^(7-p) bit_p of 64 inputs; plane p's word at p_p + a."""
    q = _qmask_add(_qzero(), p0 + a, w0)
    q = _qmask_add(q, p1 + a, w1)
    if bits > 2:
        q = _qmask_add(q, p2 + a, w2)
        if bits > 3:
            q = _qmask_add(q, p3 + a, w3)
            if bits > 4:
                q = _qmask_add(q, p4 + a, w4)
                if bits > 5:
                    q = _qmask_add(q, p5 + a, w5)
                    if bits > 6:
                        q = _qmask_add(q, p6 + a, w6)
                        if bits > 7:
                            q = _qmask_add(q, p7 + a, w7)
    return q


@njit(inline='always')
def _low_mean(bits):
    """An msb row's offset is min + s * this: the mean of the code's dropped low bits, (2^(8-b) - 1) / 2."""
    return np.float32((2 ** (MAX_BITS - bits) - 1) / 2)


@njit(inline='always')
def _coefs(CA, moff, ng, ngp, bits, mwq, o, C, OFF, Dsc, Dsum, unit):
    """Row o's coefficient of each code per group (C [k, ngp]) and offsets (OFF [ngp]), from fp16.

    msb: one code q = sum_p 2^(7-p) bit_p with coefficient s, offset min + s (2^(8-b) - 1) / 2.
    mwq: code 0 = 128 b0 + 64 b1 with s / 64; code k >= 1 = 128 bit_(k+1) with alpha / 64;
    offset min - sum alpha (nested.group_coefficients). With one token (Dsc != 0) the coefficients
    take its digit scales d_g (times unit, the digit's weight) and the offsets . sums(x_g) are
    returned; else 0."""
    kb = _low_mean(bits)
    voff = _fzero()
    for g0 in range(0, ng, 16):
        n = min(16, ng - g0)
        m = 2 * (o * ng + g0) + moff
        vs = _h2f(_ldi(CA) + m, n)
        vm = _h2f(_ldi(CA + 8) + m, n)
        vd = _fmul(_fload(Dsc + 4 * g0), _fsplat(unit)) if Dsc else _fone()
        if mwq:
            vd64 = _fmul(vd, _fsplat(np.float32(1 / 64)))
            _fstore(_fmul(vs, vd64), C + 4 * g0)
            for p in range(BASE_BITS, bits):
                va = _h2f(_ldi(CA + 8 * p) + m, n)
                _fstore(_fmul(va, vd64), C + 4 * ((p - 1) * ngp + g0))
                vm = _fsub(vm, va)
        else:
            _fstore(_fmul(vs, vd), C + 4 * g0)
            vm = _fma_s(vm, vs, kb)
        if Dsc:
            voff = _fma_v(voff, vm, _fload(Dsum + 4 * g0))
        else:
            _fstore(vm, OFF + 4 * g0)
    return _fsum(voff)


@njit(inline='always')
def _row_coefs(CA, md, bits, o0, o1, Dsc, Dsum, unit, C, T):
    """_coefs of msb rows o0..o1 with one token, in one pass over their contiguous fp16 metadata, 16
    at a time: C[(o - o0) ng + g] = s d_g unit and C[n + 16 + (o - o0) ng + g] = (min + s kb) sum_g,
    n = (o1 - o0) ng (C holds 2 n + 32 floats). T (2 (ng + 16) floats) is scratch: d_g unit and
    sum_g repeated, so that 16 lanes starting at any group read theirs with one load. C[n..n+16) is
    zeroed: the GEMVs' pairs of groups read C[n] after a last row of odd ng (times a zero dot, so it
    must not be NaN; it was left unwritten when 16 divides n). Per row,
    _coefs took ~17 ns on Zen 3 (masks, reductions), about what the 8 groups of an OLMoE down row
    take to compute."""
    ng, moff = md[3], md[7]
    kb = _low_mean(bits)
    span = ng + 16
    for k0 in range(0, span, ng):  # (no k % ng: a 64-bit division per use cost more than the rest)
        for g in range(min(ng, span - k0)):
            T[k0 + g] = _ldf(Dsc + 4 * g) * unit
            T[span + k0 + g] = _ldf(Dsum + 4 * g)
    TA, n, m = _addr(T), (o1 - o0) * ng, 2 * o0 * ng + moff
    sa, ma = _ldi(CA) + m, _ldi(CA + 8) + m
    k = 0  # i % ng
    for i in range(0, n, 16):
        r = min(16, n - i)
        if r == 16:
            vs, vm = _h2f16(sa + 2 * i), _h2f16(ma + 2 * i)
        else:
            vs, vm = _h2f(sa + 2 * i, r), _h2f(ma + 2 * i, r)
        _fstore(_fmul(vs, _fload(TA + 4 * k)), C + 4 * i)
        _fstore(_fmul(_fma_s(vm, vs, kb), _fload(TA + 4 * (span + k))), C + 4 * (n + 16 + i))
        k += 16
        while k >= ng:
            k -= ng
    _fstore(_fzero(), C + 4 * n)  # the gap: a lone last group's pair reads C[n] past the last row


@njit(inline='always')
def _row_sum(p, n):
    """The sum of the n floats at address p (two chains)."""
    s0, s1 = np.float32(0.0), np.float32(0.0)
    for g in range(0, n - 1, 2):
        s0 += _ldf(p + 4 * g)
        s1 += _ldf(p + 4 * g + 4)
    if n & 1:
        s0 += _ldf(p + 4 * (n - 1))
    return s0 + s1


@njit(inline='always')
def _dot2(one, h, lo, q, x, npad):
    """Accumulate q . (high, low digits) of 64 inputs at address x; only the high digit if one."""
    if one:
        return _dpbusd(h, q, x), lo
    return _dpbusd(h, q, x), _dpbusd(lo, q, x + npad)


@njit(inline='always')
def _flush(one, h, lo):
    """The group's dot as floats, in units of the high digit (one) or of the low digit."""
    if one:
        return _i2f(h)
    return _join_digits(h, lo)


@njit(inline='always')
def _act_form(one, Dsum, ngp):
    """(digit unit, address of the sums the offsets take) for int8 (one) or int16 activations of a row
    whose sums [2, ngp] start at Dsum (_digit_row)."""
    if one:
        return HIGH_UNIT, Dsum + 4 * ngp
    return ONE_UNIT, Dsum


@njit(inline='always')
def _group128(one, acc, q0, q1, xb, npad, cg):
    """acc + C[g] * (codes q0 q1) . (digits of 128 inputs at xb)."""
    h, lo = _dot2(one, _izero(), _izero(), q0, xb, npad)
    h, lo = _dot2(one, h, lo, q1, xb + 64, npad)
    return _fma_s(acc, _flush(one, h, lo), _ldf(cg))


@njit(inline='always')
def _plane_block(p, n):
    """The 64 bytes at address p; n < 64: the first n, zeros after (a masked load, which costs an
    extra uop, so full blocks pass the literal 64)."""
    if n < 64:
        return _qload_n(p, n)
    return _qload(p)


@njit(inline='always')
def _block512(NW, one, bits, a, n, acc, xb, cg, npad, p0, p1, p2, p3, p4, p5, p6, p7):
    """acc + the 4 groups of 512 weights whose plane bytes start at a (n of them)."""
    q = _codes512(NW, bits, _plane_block(p0 + a, n), _plane_block(p1 + a, n), _plane_block(p2 + a, n),
                  _plane_block(p3 + a, n), _plane_block(p4 + a, n), _plane_block(p5 + a, n),
                  _plane_block(p6 + a, n), _plane_block(p7 + a, n))
    acc = _group128(one, acc, q[0], q[1], xb, npad, cg)
    acc = _group128(one, acc, q[2], q[3], xb + 128, npad, cg + 4)
    acc = _group128(one, acc, q[4], q[5], xb + 256, npad, cg + 8)
    return _group128(one, acc, q[6], q[7], xb + 384, npad, cg + 12)


@njit(inline='always')
def _row_msb512(NW, one, bits, a, rb, xb, cg, npad, p0, p1, p2, p3, p4, p5, p6, p7):
    """sum_g C[g] * q_g . x_g over one msb row of group-128 codes (rb plane bytes), codes built 512
    at a time; a last block of 1-3 groups reads zeros past the row (and x digits and C[g] past it:
    padding that is there, C[g] = 0)."""
    acc = _fzero()
    full = rb // 64
    for k in range(full):
        acc = _block512(NW, one, bits, a + 64 * k, 64, acc, xb + 512 * k, cg + 16 * k, npad,
                        p0, p1, p2, p3, p4, p5, p6, p7)
    if rb > 64 * full:
        acc = _block512(NW, one, bits, a + 64 * full, rb - 64 * full, acc, xb + 512 * full, cg + 16 * full,
                        npad, p0, p1, p2, p3, p4, p5, p6, p7)
    return acc


@njit(inline='always')
def _plane_addrs(CA, poff, bits):
    """Addresses of the 8 planes of a matrix (chunk addresses at CA); planes at or above bits alias
    plane 0: the GEMVs read them, then mask them out."""
    p0 = _ldi(CA) + poff
    p1 = _ldi(CA + 8) + poff
    p2 = _ldi(CA + 16) + poff if bits > 2 else p0
    p3 = _ldi(CA + 24) + poff if bits > 3 else p0
    p4 = _ldi(CA + 32) + poff if bits > 4 else p0
    p5 = _ldi(CA + 40) + poff if bits > 5 else p0
    p6 = _ldi(CA + 48) + poff if bits > 6 else p0
    p7 = _ldi(CA + 56) + poff if bits > 7 else p0
    return p0, p1, p2, p3, p4, p5, p6, p7


@njit(inline='always')
def _prefetch_ahead(CA, md, bits, o, dist):
    """Prefetch the planes of row o + dist and the first line of row o + 2 dist's fp16 scales and
    minima (all its lines, for rows of up to 32 groups, cost more than they saved)."""
    rb, poff, moff = md[5], md[6], md[7]
    if o + dist < md[0]:
        pa = (o + dist) * rb
        for k in range(pa, pa + rb, 64):
            for p in range(bits):
                _prefetch(_ldi(CA + 8 * p) + poff + k)
    if o + 2 * dist < md[0]:
        ma = 2 * (o + 2 * dist) * md[3] + moff
        _prefetch(_ldi(CA) + ma)
        _prefetch(_ldi(CA + 8) + ma)


@njit(cache=True)
def _gemv_msb128(NW, one, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y):
    """_gemv for msb at group 128 with bits <= NW (a literal: 2, 4 or 8, the shuffle network's width),
    one (a literal) = bits <= ACT8_MAX_BITS.
    Plane rows are also prefetched PREFETCH_BYTES ahead: alone, the hardware prefetcher lagged at
    low bits (a 2-bit GEMV took as long as a 4-bit one). So are the rows' metadata, twice as far:
    without it a GEMV from DRAM took its time from L3 plus the whole transfer, no overlap (Zen 5, one
    thread, 2880x2880: 2 bits 168 -> 113 us, 4 bits 219 -> 163 us; L3-resident: 106 / 161 us)."""
    CA, C = _addr(ca), _addr(coef)
    ng, ngp, rb, poff, moff = md[3], md[4], md[5], md[6], md[7]
    npad, dist = ng * 128, -(-PREFETCH_BYTES // rb)
    unit, S = _act_form(one, Dsum, ngp)
    p0, p1, p2, p3, p4, p5, p6, p7 = _plane_addrs(CA, poff, bits)
    for o in range(o0, o1):
        yo = _coefs(CA, moff, ng, ngp, bits, False, o, C, 0, Dsc, S, unit)
        _prefetch_ahead(CA, md, bits, o, dist)
        acc = _row_msb512(NW, one, bits, o * rb, rb, X, C, npad, p0, p1, p2, p3, p4, p5, p6, p7)
        y[o - o0] = yo + _fsum(acc)


@njit(cache=True)
def _gemv_strided(W, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y):
    """_gemv for msb at group 128 on AVX2 without AVX-512: 256 weights per step (simd._dot256) at
    width class W (a literal: 2, 4 or 8, as _gemv_msb128), with the strided activations."""
    CA, C = _addr(ca), _addr(coef)
    ng, ngp, rb, poff = md[3], md[4], md[5], md[6]
    dist = -(-PREFETCH_BYTES // rb)
    one = bits <= ACT8_MAX_BITS
    unit, S = _act_form(one, Dsum, ngp)
    X = X8 if one else X16
    xstep = 256 if one else 512
    scale = np.float32(2 ** (MAX_BITS - W))  # the codes are q >> (8 - W)
    p0, p1, p2, p3, p4, p5, p6, p7 = _plane_addrs(CA, poff, bits)
    full, n = ng // 2, (o1 - o0) * ng
    _row_coefs(CA, md, bits, o0, o1, Dsc, S, unit, C, tile)
    for o in range(o0, o1):
        c = C + 4 * (o - o0) * ng
        yo = _row_sum(c + 4 * (n + 16), ng)
        _prefetch_ahead(CA, md, bits, o, dist)
        a = o * rb
        acc = _f8zero()
        for k in range(full):
            dots = _dot256(W, 32, bits, a + 32 * k, X + xstep * k, p0, p1, p2, p3, p4, p5, p6, p7)
            acc = _fma_pair(acc, dots, c + 8 * k)
        if ng > 2 * full:  # a last lone group: its pair's second lane multiplies a zero dot
            acc = _fma_pair(acc, _dot256(W, 16, bits, a + 32 * full, X + xstep * full,
                                         p0, p1, p2, p3, p4, p5, p6, p7), c + 8 * full)
        y[o - o0] = yo + scale * _fsum(acc)


@njit(inline='always')
def _nibble_addr(CA, poff, rb, o):
    """Address of row o's nibble codes in an expert held in nibble form (to_nibble_form): the rows
    4k..4k+3 take the bytes their 4 planes held, row 4k+j in chunk j."""
    return _ldi(CA + 8 * (o & 3)) + poff + (o - (o & 3)) * rb


@njit(inline='always')
def _nibble_mask(bits):
    """The mask that keeps a nibble's top min(bits, 4) bits."""
    return (0xF0 >> min(bits, 4)) & 0x0F


@njit(inline='always')
def _prefetch_meta(CA, md, o):
    """Prefetch the first line of row o's fp16 scales and minima."""
    ma = 2 * o * md[3] + md[7]
    _prefetch(_ldi(CA) + ma)
    _prefetch(_ldi(CA + 8) + ma)


@njit(inline='always')
def _prefetch_nibble_row(CA, md, bits, o):
    """Prefetch row o's nibble codes, its planes 4.. (bits > 4) and the first line of its metadata."""
    if o < md[0]:
        rb, poff = md[5], md[6]
        q = _nibble_addr(CA, poff, rb, o)
        for k in range(0, 4 * rb, 64):
            _prefetch(q + k)
        for p in range(4, bits):
            for k in range(o * rb, o * rb + rb, 64):
                _prefetch(_ldi(CA + 8 * p) + poff + k)
        _prefetch_meta(CA, md, o)


@njit(inline='always')
def _row_offsets(p, n):
    """A row's n offsets at address p (_row_coefs) as (8 float lanes, a float) whose sums add up to
    theirs: in the lanes, 8 at a time, where 8 divides n (one vector add per 8 offsets, and the row's
    one horizontal sum), else in the float (_row_sum)."""
    if n % 8:
        return _f8zero(), _row_sum(p, n)
    acc = _f8load(p)
    for k in range(8, n, 8):
        acc = _f8add(acc, _f8load(p + 4 * k))
    return acc, np.float32(0.0)


@njit(cache=True)
def _gemv_nibble(ca, md, bits, X, X16, Dsc, Dsum, o0, o1, coef, tile, y, nq=0):
    """_gemv for an msb expert held in nibble form (group 128, on AVX2): the top 4 bits of each code
    from its nibble (masked to the top bits below 4 bits) and, above 4 bits, the rest from planes
    4..bits-1 (simd._dot256_low, strided int16 activations X16) in the same group sums.
    q = 16 n + r: int8 activations (bits <= 4) give C[g] (n . h), the 16 taken into C; int16 ones
    C[g] * (4096 (n . h) + 16 (n . l)) + C[g] * (r . x16).
    nq != 0 (bits <= 4 only): row o's nibbles are at nq + (o - o0) 4 rb instead (_nibble_rows)."""
    CA, C = _addr(ca), _addr(coef)
    ng, ngp, rb, poff = md[3], md[4], md[5], md[6]
    npad, dist = ng * 128, -(-PREFETCH_BYTES // (4 * rb))
    one = bits <= ACT8_MAX_BITS
    unit, S = _act_form(one, Dsum, ngp)
    mask = _nibble_mask(bits)
    p4 = _ldi(CA + 32) + poff if bits > 4 else 0
    p5 = _ldi(CA + 40) + poff if bits > 5 else p4
    p6 = _ldi(CA + 48) + poff if bits > 6 else p4
    p7 = _ldi(CA + 56) + poff if bits > 7 else p4
    full, n = ng // 2, (o1 - o0) * ng
    # int8 activations: the codes' 16 folded into C (a scalar multiply per group in the loop cost more)
    _row_coefs(CA, md, bits, o0, o1, Dsc, S, unit * np.float32(16.0) if one else unit, C, tile)
    for o in range(o0, o1):
        c = C + 4 * (o - o0) * ng
        acc, yo = _row_offsets(c + 4 * (n + 16), ng)
        q = nq + (o - o0) * 4 * rb if nq else _nibble_addr(CA, poff, rb, o)
        if one:
            ahead = o + dist < md[0] and not nq
            qa = _nibble_addr(CA, poff, rb, o + dist)
            if ahead:
                _prefetch_meta(CA, md, o + dist)
            for g in range(ng):  # a line of the row ahead per group: no prefetch loop of its own
                if ahead:
                    _prefetch(qa + 64 * g)
                acc = _fma8(acc, _dot_nib128(_i8zero(), q + 64 * g, X + 128 * g, mask), _ldf(c + 4 * g))
        else:
            _prefetch_nibble_row(CA, md, bits, o + dist)
            for g in range(ng):
                cg, qg = _ldf(c + 4 * g), q + 64 * g
                acc = _fma8(acc, _dot_nib128(_i8zero(), qg, X + 128 * g, 15), cg * np.float32(4096.0))
                acc = _fma8(acc, _dot_nib128(_i8zero(), qg, X + npad + 128 * g, 15), cg * np.float32(16.0))
            a = o * rb
            for k in range(full):
                low = _dot256_low(32, bits - 4, a + 32 * k, X16 + 512 * k, p4, p5, p6, p7)
                acc = _fma_pair(acc, low, c + 8 * k)
            if ng > 2 * full:
                low = _dot256_low(16, bits - 4, a + 32 * full, X16 + 512 * full, p4, p5, p6, p7)
                acc = _fma_pair(acc, low, c + 8 * full)
        y[o - o0] = yo + _fsum(acc)


@njit(inline='always')
def _token_addrs(dig, dsc, dsum, md, r):
    """Addresses of digit row r's digits, scales and sums (_digits_of's arrays) for matrix md."""
    ngp = md[4]
    return _addr(dig) + 2 * md[3] * md[2] * r, _addr(dsc) + 4 * ngp * r, _addr(dsum) + 8 * ngp * r


@njit(cache=True)
def _gemv_nibble4(ca, md, bits, dig, dsc, dsum, drows, d, o0, o1, coef, tile, y, i0, yoff, nq):
    """_gemv_nibble with int8 activations for the 4 tokens of digit rows drows[d..d+3], token k's row o
    into y[i0 + k, yoff + o - o0]: the 4 dots of a group share its nibbles' load and unpacking (LLVM
    merges the 4 identical loads and masks). coef holds 4 x (2 n + 32) floats (n = (o1 - o0) ng)."""
    CA = _addr(ca)
    ng, ngp, rb, poff = md[3], md[4], md[5], md[6]
    n = (o1 - o0) * ng
    dist = -(-PREFETCH_BYTES // (4 * rb))
    mask = _nibble_mask(bits)
    stride = 4 * (2 * n + 32)
    C0 = _addr(coef)
    C1, C2, C3 = C0 + stride, C0 + 2 * stride, C0 + 3 * stride
    for k in range(4):
        _, ds, dsm = _token_addrs(dig, dsc, dsum, md, drows[d + k])
        unit, S = _act_form(True, dsm, ngp)
        _row_coefs(CA, md, bits, o0, o1, ds, S, unit * np.float32(16.0), C0 + k * stride, tile)
    X0 = _token_addrs(dig, dsc, dsum, md, drows[d])[0]
    X1 = _token_addrs(dig, dsc, dsum, md, drows[d + 1])[0]
    X2 = _token_addrs(dig, dsc, dsum, md, drows[d + 2])[0]
    X3 = _token_addrs(dig, dsc, dsum, md, drows[d + 3])[0]
    for o in range(o0, o1):
        r = 4 * (o - o0) * ng
        f = r + 4 * (n + 16)
        a0, y0 = _row_offsets(C0 + f, ng)
        a1, y1 = _row_offsets(C1 + f, ng)
        a2, y2 = _row_offsets(C2 + f, ng)
        a3, y3 = _row_offsets(C3 + f, ng)
        q = nq + (o - o0) * 4 * rb if nq else _nibble_addr(CA, poff, rb, o)
        ahead = o + dist < md[0] and not nq
        qa = _nibble_addr(CA, poff, rb, o + dist)
        for g in range(ng):
            if ahead:
                _prefetch(qa + 64 * g)
            qg, c = q + 64 * g, r + 4 * g
            a0 = _fma8(a0, _dot_nib128(_i8zero(), qg, X0 + 128 * g, mask), _ldf(C0 + c))
            a1 = _fma8(a1, _dot_nib128(_i8zero(), qg, X1 + 128 * g, mask), _ldf(C1 + c))
            a2 = _fma8(a2, _dot_nib128(_i8zero(), qg, X2 + 128 * g, mask), _ldf(C2 + c))
            a3 = _fma8(a3, _dot_nib128(_i8zero(), qg, X3 + 128 * g, mask), _ldf(C3 + c))
        at = yoff + o - o0
        y[i0, at] = y0 + _fsum(a0)
        y[i0 + 1, at] = y1 + _fsum(a1)
        y[i0 + 2, at] = y2 + _fsum(a2)
        y[i0 + 3, at] = y3 + _fsum(a3)


@njit(cache=True)
def _gemv_lut2(ca, md, Tab, Tsc, Dsum, o0, o1, y):
    """y[o - o0] = W_2[o] . x for one token on rows o0..o1 (whole blocks of LUT_ROWS) of an msb expert
    held in LUT form (to_lut_form) at 2 bits: per block and group, the token's tables at Tab (_lut_tables)
    looked up by the rows' plane bits (_lut2_dot16), times the 16 rows' scales (stored side by side)
    s d_g st (Tsc) 64 HIGH_UNIT (the dots count codes 2 b0 + b1 = q / 64), plus their offsets
    (min + s (2^6 - 1) / 2) times the sum of the token's int8 inputs: every step 16 rows wide."""
    CA, Y = _addr(ca), _addr(y)
    ng, ngp, rb, poff, moff = md[3], md[4], md[5], md[6], md[7]
    unit, S = _act_form(True, Dsum, ngp)
    unit *= np.float32(64.0)
    kb = _low_mean(2)
    p0, p1 = _ldi(CA) + poff, _ldi(CA + 8) + poff
    sa, ma = _ldi(CA) + moff, _ldi(CA + 8) + moff
    for b0 in range(o0, o1, LUT_ROWS):
        q0, q1, m = p0 + b0 * rb, p1 + b0 * rb, 2 * b0 * ng
        acc = _fzero()
        for g in range(ng):
            vs, vm = _h2f16(sa + m + 32 * g), _h2f16(ma + m + 32 * g)
            dots = _lut2_dot16(q0 + 256 * g, q1 + 256 * g, Tab + 512 * g)
            acc = _fma16(acc, dots, _fmul(vs, _fsplat(_ldf(Tsc + 4 * g) * unit)))
            acc = _fma_v(acc, _fma_s(vm, vs, kb), _fsplat(_ldf(S + 4 * g)))
        _fstore(acc, Y + 4 * (b0 - o0))


@njit(cache=True)
def _gemv_masks(ca, md, bits, mwq, X, Dsc, Dsum, o0, o1, w, coef, y):
    """_gemv for every scheme and group: codes built 64 at a time by masked byte adds."""
    CA, W, C = _addr(ca), _addr(w), _addr(coef)
    G, ng, ngp, rbytes, poff, moff = md[2], md[3], md[4], md[5], md[6], md[7]
    npad, nch, gb = ng * G, G // 64, G // 8
    p0, p1, p2, p3 = _ldi(CA) + poff, _ldi(CA + 8) + poff, _ldi(CA + 16) + poff, _ldi(CA + 24) + poff
    p4, p5, p6, p7 = _ldi(CA + 32) + poff, _ldi(CA + 40) + poff, _ldi(CA + 48) + poff, _ldi(CA + 56) + poff
    w0, w1, w2, w3 = _qload(W), _qload(W + 64), _qload(W + 128), _qload(W + 192)
    w4, w5, w6, w7 = _qload(W + 256), _qload(W + 320), _qload(W + 384), _qload(W + 448)
    b = 2 if mwq else bits
    one = bits <= ACT8_MAX_BITS
    unit, S = _act_form(one, Dsum, ngp)
    for o in range(o0, o1):
        yo = _coefs(CA, moff, ng, ngp, bits, mwq, o, C, 0, Dsc, S, unit)
        acc = _fzero()
        for g in range(ng):
            a, xb = o * rbytes + g * gb, X + g * G
            h, lo = _izero(), _izero()
            for c in range(nch):
                h, lo = _dot2(one, h, lo, _qbuild(a + 8 * c, b, p0, p1, p2, p3, p4, p5, p6, p7,
                                                  w0, w1, w2, w3, w4, w5, w6, w7), xb + 64 * c, npad)
            acc = _fma_s(acc, _flush(one, h, lo), _ldf(C + 4 * g))
            if mwq:
                for p in range(BASE_BITS, bits):
                    pa = _ldi(CA + 8 * p) + poff + a
                    h, lo = _izero(), _izero()
                    for c in range(nch):
                        h, lo = _dot2(one, h, lo, _qmask_add(_qzero(), pa + 8 * c, w0), xb + 64 * c, npad)
                    acc = _fma_s(acc, _flush(one, h, lo), _ldf(C + 4 * ((p - 1) * ngp + g)))
        y[o - o0] = yo + _fsum(acc)


@njit(cache=True)
def _gemv(ca, md, bits, mwq, nib, X, X8, X16, Dsc, Dsum, o0, o1, w, coef, tile, y):
    """y[o - o0] = W_b[o] . x for one token: X digits, X8 / X16 strided digits, Dsc scales, Dsum sums
    (addresses); nib: the expert is held in nibble form (only where STRIDED: nibble_form)."""
    if STRIDED:  # a constant, as GFNI
        if nib:
            _gemv_nibble(ca, md, bits, X, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            return
        if md[2] == 128 and not mwq:
            if bits == 2:
                _gemv_strided(2, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            elif bits <= 4:
                _gemv_strided(4, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            else:
                _gemv_strided(8, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            return
    if GFNI:  # a constant: numba prunes the other branch, so no target compiles what it lacks
        if md[2] == 128 and not mwq:  # the default format: the shuffle-network kernel
            if bits == 2:  # (width class, int8 activations: bits <= ACT8_MAX_BITS) as literals
                _gemv_msb128(2, True, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y)
            elif bits <= 4:
                _gemv_msb128(4, True, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y)
            else:
                _gemv_msb128(8, False, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y)
            return
    _gemv_masks(ca, md, bits, mwq, X, Dsc, Dsum, o0, o1, w, coef, y)


@njit(inline='always')
def _gemm_dot(form, one, h, lo, q, qa, x, x16, npad):
    """_dot2 of 64 codes (q, also at address qa) and a token's inputs: form 0 as _dot2; on AVX2
    form 1 takes codes <= 15 (vpmaddubsw) and form 2 the int16 inputs at x16 (vpmaddwd), both
    leaving the whole dot in h (flushed as one digit)."""
    if STRIDED:
        if form == 1:
            return _dot_nibbles(h, q, x), lo
        if form == 2:
            return _dot_bytes(_dot_bytes(h, qa, x16), qa + 32, x16 + 64), lo
    return _dot2(one, h, lo, q, x, npad)


@njit(inline='always')
def _nibble_codes(q, a, bits, form, CA, poff, w4, w5, w6, w7):
    """_qbuild's 64 codes for an expert in nibble form: the nibbles at q (the top 4 bits; as numbers
    q >> (8 - bits) in form 1) plus planes 4..bits-1 at offset a."""
    if form == 1:
        return _nib_codes64(q, 15, 8 - bits)
    c = _nib_codes64(q, _nibble_mask(bits), 0)
    if bits > 4:
        c = _qmask_add(c, _ldi(CA + 32) + poff + a, w4)
        if bits > 5:
            c = _qmask_add(c, _ldi(CA + 40) + poff + a, w5)
            if bits > 6:
                c = _qmask_add(c, _ldi(CA + 48) + poff + a, w6)
                if bits > 7:
                    c = _qmask_add(c, _ldi(CA + 56) + poff + a, w7)
    return c


@njit(cache=True)
def _gemm(ca, md, bits, mwq, nib, dig, x16, dsc, dsum, drows, d0, n, o0, o1, w, coef, off, qbuf, accs, y):
    """y[i, o - o0] = W_b[o] . x_i for n tokens (digit rows drows[d0 + i], int16 inputs x16); codes
    built once (nib: from an expert in nibble form)."""
    one = bits <= ACT8_MAX_BITS
    form = 0  # _gemm_dot: generic; on AVX2, 1 for msb codes <= 15, 2 for the int16 inputs
    if STRIDED:
        form = 2 if not one else 0 if mwq else 1
    if form == 1:  # codes q >> (8 - bits), so their coefficients take 2^(8 - bits)
        w = _LOW_POWERS[bits]
    CA, W, C, OFF = _addr(ca), _addr(w), _addr(coef), _addr(off)
    G, ng, ngp, rbytes, poff, moff = md[2], md[3], md[4], md[5], md[6], md[7]
    npad, nch, gb = ng * G, G // 64, G // 8
    p0, p1, p2, p3 = _ldi(CA) + poff, _ldi(CA + 8) + poff, _ldi(CA + 16) + poff, _ldi(CA + 24) + poff
    p4, p5, p6, p7 = _ldi(CA + 32) + poff, _ldi(CA + 40) + poff, _ldi(CA + 48) + poff, _ldi(CA + 56) + poff
    w0, w1, w2, w3 = _qload(W), _qload(W + 64), _qload(W + 128), _qload(W + 192)
    w4, w5, w6, w7 = _qload(W + 256), _qload(W + 320), _qload(W + 384), _qload(W + 448)
    ncode = bits - 1 if mwq else 1
    unit = HIGH_UNIT if one else ONE_UNIT
    if form == 1:
        unit *= np.float32(2 ** (MAX_BITS - bits))
    X16, n16 = _addr(x16), x16.shape[1]
    Q, A = _addr(qbuf), _addr(accs)
    X, Dsc, Dsum = _addr(dig), _addr(dsc), _addr(dsum)
    for o in range(o0, o1):
        _coefs(CA, moff, ng, ngp, bits, mwq, o, C, OFF, 0, 0, ONE_UNIT)
        for i in range(n):
            r = drows[d0 + i]
            voff = _fzero()
            for g0 in range(0, ng, 16):
                voff = _fma_v(voff, _fload(OFF + 4 * g0), _fload(Dsum + 4 * ((2 * r + one) * ngp + g0)))
            _fstore(voff, A + 64 * i)
        qn = _nibble_addr(CA, poff, rbytes, o) if nib else 0
        for g in range(ng):
            a = o * rbytes + g * gb
            for c in range(nch):
                if nib:
                    _qstore(_nibble_codes(qn + 4 * (a + 8 * c - o * rbytes), a + 8 * c, bits, form, CA, poff,
                                          w4, w5, w6, w7), Q + 64 * c)
                    continue
                b = 2 if mwq else bits
                _qstore(_qbuild(a + 8 * c, b, p0, p1, p2, p3, p4, p5, p6, p7,
                                w0, w1, w2, w3, w4, w5, w6, w7), Q + 64 * c)
                for p in range(BASE_BITS, bits if mwq else 0):
                    _qstore(_qmask_add(_qzero(), _ldi(CA + 8 * p) + poff + a + 8 * c, w0),
                            Q + 64 * ((p - 1) * nch + c))
            for i0 in range(0, n, 4):  # 4 tokens per pass share each code load
                # a short last block repeats token n-1: same inputs, same bits, harmless stores
                i1, i2, i3 = min(i0 + 1, n - 1), min(i0 + 2, n - 1), min(i0 + 3, n - 1)
                r0, r1, r2, r3 = drows[d0 + i0], drows[d0 + i1], drows[d0 + i2], drows[d0 + i3]
                x0, x1 = X + 2 * npad * r0 + g * G, X + 2 * npad * r1 + g * G
                x2, x3 = X + 2 * npad * r2 + g * G, X + 2 * npad * r3 + g * G
                e0, e1 = _ldf(Dsc + 4 * (r0 * ngp + g)), _ldf(Dsc + 4 * (r1 * ngp + g))
                e2, e3 = _ldf(Dsc + 4 * (r2 * ngp + g)), _ldf(Dsc + 4 * (r3 * ngp + g))
                f0, f1 = _fload(A + 64 * i0), _fload(A + 64 * i1)
                f2, f3 = _fload(A + 64 * i2), _fload(A + 64 * i3)
                for k in range(ncode):
                    h0, l0, h1, l1 = _izero(), _izero(), _izero(), _izero()
                    h2, l2, h3, l3 = _izero(), _izero(), _izero(), _izero()
                    for c in range(nch):
                        qa = Q + 64 * (k * nch + c)
                        q = _qload(qa)
                        Y = X16 + 2 * (g * G + 64 * c)  # + the token's row
                        h0, l0 = _gemm_dot(form, one, h0, l0, q, qa, x0 + 64 * c, Y + 2 * n16 * r0, npad)
                        h1, l1 = _gemm_dot(form, one, h1, l1, q, qa, x1 + 64 * c, Y + 2 * n16 * r1, npad)
                        h2, l2 = _gemm_dot(form, one, h2, l2, q, qa, x2 + 64 * c, Y + 2 * n16 * r2, npad)
                        h3, l3 = _gemm_dot(form, one, h3, l3, q, qa, x3 + 64 * c, Y + 2 * n16 * r3, npad)
                    ck = _ldf(C + 4 * (k * ngp + g)) * unit
                    whole = one or form == 2
                    f0 = _fma_s(f0, _flush(whole, h0, l0), ck * e0)
                    f1 = _fma_s(f1, _flush(whole, h1, l1), ck * e1)
                    f2 = _fma_s(f2, _flush(whole, h2, l2), ck * e2)
                    f3 = _fma_s(f3, _flush(whole, h3, l3), ck * e3)
                _fstore(f0, A + 64 * i0)
                _fstore(f1, A + 64 * i1)
                _fstore(f2, A + 64 * i2)
                _fstore(f3, A + 64 * i3)
        for i in range(n):
            y[i, o - o0] = _fsum(_fload(A + 64 * i))


@njit(cache=True)
def _rows(ca, md, bits, mwq, form, dig, xs, dsc, dsum, drows, d0, n, o0, o1, W, out, orows, oscale, accumulate):
    """Rows o0..o1 of one matrix for n tokens of an expert held in `form`; out[orows[d0+i], o] (+)=
    oscale[d0+i] * y."""
    # scratch is passed as arrays, never as bare addresses: numba frees an array after its last use
    ngp = md[4]
    nib = form == NIBBLE_FORM
    y = np.empty((n, o1 - o0), np.float32)
    if STRIDED and form == LUT_FORM:  # (2 bits: _unit_addresses) one GEMV per token and block of rows
        _lut_rows(ca, md, xs[3], xs[4], dsum, drows, d0, n, o0, o1, y)
        _put_rows(y, n, o0, o1, out, orows, oscale, d0, accumulate)
        return
    # more than one token, at <= 4 bits on AVX2: a GEMV per token over blocks of rows (PASS_BYTES),
    # from the nibble form, or from nibbles of the block's msb planes (at group 128) written in scratch
    planes = not nib and not mwq and STRIDED and md[2] == 128
    if n == 1 or (bits <= ACT8_MAX_BITS and (nib or planes)):
        x8, x16 = xs[0], xs[1]
        quads = n // 4 if STRIDED and n > 1 else 0  # tokens 4 at a time (_gemv_nibble4), then one by one
        # also _row_coefs' C, one per token of a quad
        coef = np.empty(max(8 * ngp, (4 if quads else 1) * (2 * (o1 - o0) * md[3] + 32)), np.float32)
        tile = np.empty(2 * (md[3] + 16), np.float32)
        step = o1 - o0 if n == 1 else max(4, PASS_BYTES // (64 * md[3]))
        scratch = n > 1 and planes
        nib_rows = np.empty(step * 4 * md[5] if scratch else 0, np.uint8)
        for s0 in range(o0, o1, step):
            s1 = min(o1, s0 + step)
            if STRIDED:  # a constant (as in _gemv): no other target compiles the nibble kernels
                if scratch:
                    _nibble_rows(_addr(ca), md, bits, s0, s1, nib_rows)
                for i in range(0, 4 * quads, 4):
                    _gemv_nibble4(ca, md, bits, dig, dsc, dsum, drows, d0 + i, s0, s1, coef, tile, y, i,
                                  s0 - o0, _addr(nib_rows) if scratch else 0)
            for i in range(4 * quads, n):
                r = drows[d0 + i]
                X, ds, dsm = _token_addrs(dig, dsc, dsum, md, r)
                if STRIDED:
                    if scratch:
                        _gemv_nibble(ca, md, bits, X, 0, ds, dsm, s0, s1, coef, tile, y[i, s0 - o0:],
                                     _addr(nib_rows))
                        continue
                X8, X16 = _addr(x8) + x8.shape[1] * r, _addr(x16) + 2 * x16.shape[1] * r
                _gemv(ca, md, bits, mwq, nib, X, X8, X16, ds, dsm, s0, s1, W, coef, tile, y[i, s0 - o0:])
    else:
        qbuf = np.empty(MAX_BITS * md[2], np.uint8)
        _gemm(ca, md, bits, mwq, nib, dig, xs[2], dsc, dsum, drows, d0, n, o0, o1, W,
              np.empty(8 * ngp, np.float32), np.empty(ngp, np.float32), qbuf, np.empty(16 * n, np.float32), y)
    _put_rows(y, n, o0, o1, out, orows, oscale, d0, accumulate)


@njit(inline='always')
def _put_rows(y, n, o0, o1, out, orows, oscale, d0, accumulate):
    """out[orows[d0+i], o0..o1] (+)= oscale[d0+i] * y[i]."""
    for i in range(n):
        dst = out[orows[d0 + i]]
        s = oscale[d0 + i]
        if accumulate:
            for k in range(o1 - o0):
                dst[o0 + k] += s * y[i, k]
        else:
            for k in range(o1 - o0):
                dst[o0 + k] = s * y[i, k]


@njit(inline='always')
def _lut_rows(ca, md, tab, tsc, dsum, drows, d0, n, o0, o1, y):
    """y[i] = rows o0..o1 of an expert in LUT form for the n tokens of digit rows drows[d0..]: a GEMV per
    token over blocks of rows whose plane bytes (PASS_BYTES) stay in L2 for the next token's."""
    ngp = md[4]
    step = o1 - o0 if n == 1 else max(LUT_ROWS, PASS_BYTES // (2 * md[5]) // LUT_ROWS * LUT_ROWS)
    for s0 in range(o0, o1, step):
        s1 = min(o1, s0 + step)
        for i in range(n):
            r = drows[d0 + i]
            _gemv_lut2(ca, md, _addr(tab) + tab.shape[1] * r, _addr(tsc) + 4 * ngp * r,
                       _addr(dsum) + 8 * ngp * r, s0, s1, y[i, s0 - o0:])


# ---------------------------------------------------------------------------------------------
# Parallel entry kernels: one numba call per matmul, per expert FFN, per MoE layer.

@njit(cache=True, parallel=True, nogil=True)
def _matmul_kernel(ca, md, bits, mwq, form, x, W, out):
    """out = x @ W_b.T for the matrix md of an expert whose chunk c is at address ca[c], held in `form`."""
    T = x.shape[0]
    dig, dsc, dsum = _digits_of(x, md)
    xs = _avx2_inputs(dig, dsc, md, T > 1, form == PLANE_FORM or bits > ACT8_MAX_BITS, form == LUT_FORM)
    rows = np.arange(T)
    ones = np.ones(T, np.float32)
    nblk = -(-md[0] // ROWS_PER_ITEM)
    for b in prange(nblk):
        o0 = b * ROWS_PER_ITEM
        _rows(ca, md, bits, mwq, form, dig, xs, dsc, dsum, rows, 0, T, o0, min(md[0], o0 + ROWS_PER_ITEM),
              W, out, rows, ones, False)


@njit(cache=True, parallel=True, nogil=True)
def _ffn_kernel(cas, bits, forms, mwq, x, ptr, tokens, weights, md_gu, md_dn, W, out, H):
    """out[t] += sum_j weights * down_j(silu(gate_j(x_t)) * up_j(x_t)) over routed experts j (forms[j]:
    how expert j is held)."""
    E, P = cas.shape[0], ptr[cas.shape[0]]
    I2, D = md_gu[0], md_dn[0]
    inter = I2 // 2
    dig, dsc, dsum = _digits_of(x, md_gu)
    strided, lut = False, False
    for j in range(E):
        strided |= forms[j] == PLANE_FORM or bits[j] > ACT8_MAX_BITS
        lut |= forms[j] == LUT_FORM
    xs = _avx2_inputs(dig, dsc, md_gu, x.shape[0] > 1, strided, lut)
    pairs = np.arange(P)
    ones = np.ones(P, np.float32)
    hid = np.empty((P, I2), np.float32)
    # H: numba's threads; thread h takes rows [h/H, (h+1)/H) of every expert, expert after expert:
    for h in prange(H):  # balanced whatever the bits, and a row's prefetches ahead are its own next rows
        for j in range(E):  # (layer call 0.91-0.94x of expert-interleaved 64-row items: Zen 3, 4 bits)
            if ptr[j + 1] > ptr[j]:
                r0, r1 = _share(I2, h, H), _share(I2, h + 1, H)
                for o0 in range(r0, r1, ROWS_PER_ITEM):
                    _rows(cas[j], md_gu, bits[j], mwq, forms[j], dig, xs, dsc, dsum, tokens, ptr[j],
                          ptr[j + 1] - ptr[j], o0, min(r1, o0 + ROWS_PER_ITEM), W, hid, pairs, ones, False)
    act = np.empty((P, inter), np.float32)
    dig, dsc, dsum = _digit_arrays(P, md_dn)
    for k in prange(P):  # silu(gate) * up, then its digits
        for i in range(inter):
            g = hid[k, i]
            act[k, i] = g / (np.float32(1.0) + np.exp(-g)) * hid[k, inter + i]
        _digit_row(act[k], md_dn[2], md_dn[3], dig[k], dsc[k], dsum[k])
    xs = _avx2_inputs(dig, dsc, md_dn, x.shape[0] > 1, strided, lut)
    for h in prange(H):  # thread h owns output columns [h/H, (h+1)/H): no write races
        for j in range(E):
            if ptr[j + 1] > ptr[j]:
                r0, r1 = _share(D, h, H), _share(D, h + 1, H)
                for o0 in range(r0, r1, ROWS_PER_ITEM):
                    _rows(cas[j], md_dn, bits[j], mwq, forms[j], dig, xs, dsc, dsum, pairs, ptr[j],
                          ptr[j + 1] - ptr[j], o0, min(r1, o0 + ROWS_PER_ITEM), W, out, tokens, weights, True)


@njit(inline='always')
def _share(rows, h, H):
    """First of thread h's rows out of H threads: whole blocks of LUT_ROWS (the LUT form's unit)."""
    return rows if h == H else rows * h // H // LUT_ROWS * LUT_ROWS


@njit(cache=True)
def _int16_inputs(dig):
    """The int16 activations 256 high + low of digits [T, 2, n] -> [T, n]."""
    T, n = dig.shape[0], dig.shape[2]
    out = np.empty((T, n), np.int16)
    for t in range(T):
        for i in range(n):
            out[t, i] = np.int16(dig[t, 0, i]) * 256 + dig[t, 1, i]
    return out


@njit(inline='always')
def _byte_row(Q, X, S, M, DS, DSUM, ng, G):
    """sum_g scale_g d_g (q_g . x16_g) + minimum_g sum(x_g) of one row of byte codes at address Q
    (scales at S, minima at M) and one token's int16 activations at X (scales at DS, sums at DSUM)."""
    acc, off = _fzero(), np.float32(0.0)
    for g in range(ng):
        h = _izero()
        for c in range(g * G, g * G + G, 32):
            h = _dot_bytes(h, Q + c, X + 2 * c)
        acc = _fma_s(acc, _i2f(h), _ldf(S + 4 * g) * _ldf(DS + 4 * g))
        off += _ldf(M + 4 * g) * _ldf(DSUM + 4 * g)
    return _fsum(acc) + off


@njit(inline='always')
def _nibble_row(Q, X, S, M, DS, DSUM, ng, G):
    """_byte_row for nibble codes and the int8 (high digit) activations, whose scale is 256 d_g."""
    acc, off = _f8zero(), np.float32(0.0)
    for g in range(ng):
        h = _i8zero()
        for c in range(g * G, g * G + G, 128):
            h = _dot_nib128(h, Q + c // 2, X + c, 15)
        acc = _fma8(acc, h, _ldf(S + 4 * g) * _ldf(DS + 4 * g) * HIGH_UNIT)
        off += _ldf(M + 4 * g) * _ldf(DSUM + 4 * g)
    return _fsum(acc) + off


@njit(inline='always')
def _nibble_row4(Q, X, xstride, S, M, DS, dstride, DSUM, ng, G, out, t, o):
    """_nibble_row for tokens t..t+3 (activations X + k xstride, scales DS + k dstride, sums
    DSUM + 2 k dstride) into out[t + k, o]: each group's nibbles loaded and unpacked once for 4 dots."""
    a0, a1, a2, a3 = _f8zero(), _f8zero(), _f8zero(), _f8zero()
    f0, f1, f2, f3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    X1, X2, X3 = X + xstride, X + 2 * xstride, X + 3 * xstride
    D1, D2, D3 = DS + dstride, DS + 2 * dstride, DS + 3 * dstride
    for g in range(ng):
        h0, h1, h2, h3 = _i8zero(), _i8zero(), _i8zero(), _i8zero()
        for c in range(g * G, g * G + G, 128):
            q = Q + c // 2
            h0 = _dot_nib128(h0, q, X + c, 15)
            h1 = _dot_nib128(h1, q, X1 + c, 15)
            h2 = _dot_nib128(h2, q, X2 + c, 15)
            h3 = _dot_nib128(h3, q, X3 + c, 15)
        s, m, e = _ldf(S + 4 * g), _ldf(M + 4 * g), 4 * g
        a0 = _fma8(a0, h0, s * _ldf(DS + e) * HIGH_UNIT)  # (s d) H, as _nibble_row: the same sums
        a1 = _fma8(a1, h1, s * _ldf(D1 + e) * HIGH_UNIT)
        a2 = _fma8(a2, h2, s * _ldf(D2 + e) * HIGH_UNIT)
        a3 = _fma8(a3, h3, s * _ldf(D3 + e) * HIGH_UNIT)
        f0 += m * _ldf(DSUM + e)
        f1 += m * _ldf(DSUM + 2 * dstride + e)
        f2 += m * _ldf(DSUM + 4 * dstride + e)
        f3 += m * _ldf(DSUM + 6 * dstride + e)
    out[t, o] = _fsum(a0) + f0
    out[t + 1, o] = _fsum(a1) + f1
    out[t + 2, o] = _fsum(a2) + f2
    out[t + 3, o] = _fsum(a3) + f3


@njit(inline='always')
def _code_rows(nibbles, codes, scale, minimum, X, xstride, dsc, DSUM, T, md, out):
    """out = x @ W.T for W as byte or (nibbles, a literal) nibble codes. Rows and tokens go by address:
    array slices in the parallel loop cost atomic reference counts (the nibble GEMV ran 9.8 ns per
    group of 128 with them, 4.7 without: Zen 3, one thread, weights in cache)."""
    rows, G, ng = md[0], md[2], md[3]
    Q, n, S, M, DS = _addr(codes), codes.shape[1], _addr(scale), _addr(minimum), _addr(dsc)
    quads = T // 4 if nibbles else 0  # nibbles: tokens 4 at a time (_nibble_row4), then one by one
    dstride = 4 * dsc.shape[1]
    for b in prange(-(-rows // ROWS_PER_ITEM)):
        for o in range(b * ROWS_PER_ITEM, min(rows, b * ROWS_PER_ITEM + ROWS_PER_ITEM)):
            for t4 in range(0, 4 * quads, 4):  # (its own name: a parfor body reusing t went wrong)
                _nibble_row4(Q + n * o, X + xstride * t4, xstride, S + 4 * ng * o, M + 4 * ng * o,
                             DS + dstride * t4, dstride, DSUM + 2 * dstride * t4, ng, G, out, t4, o)
            for t in range(4 * quads, T):
                q, xt, s, m = Q + n * o, X + xstride * t, S + 4 * ng * o, M + 4 * ng * o
                ds, dsum = DS + dstride * t, DSUM + 2 * dstride * t
                if nibbles:
                    out[t, o] = _nibble_row(q, xt, s, m, ds, dsum, ng, G)
                else:
                    out[t, o] = _byte_row(q, xt, s, m, ds, dsum, ng, G)


@njit(cache=True, parallel=True, nogil=True)
def _byte_matmul_kernel(codes, scale, minimum, x, md, out):
    """out = x @ W.T for W as byte codes (ByteLinear), int16 activations as the planes' at >= 5 bits."""
    dig, dsc, dsum = _digits_of(x, md)
    x16 = _int16_inputs(dig)
    _code_rows(False, codes, scale, minimum, _addr(x16), x16.strides[0], dsc, _addr(dsum), x.shape[0], md, out)


@njit(cache=True, parallel=True, nogil=True)
def _nibble_matmul_kernel(codes, scale, minimum, x, md, out):
    """out = x @ W.T for W as 4-bit nibble codes (NibbleLinear), int8 activations as the planes' at
    <= ACT8_MAX_BITS bits (their sums: dsum[t, 1])."""
    dig, dsc, dsum = _digits_of(x, md)
    _code_rows(True, codes, scale, minimum, _addr(dig), dig.strides[0], dsc, _addr(dsum) + 4 * dsc.shape[1],
               x.shape[0], md, out)


# ---------------------------------------------------------------------------------------------
# Nibble form of a resident msb expert: planes 0-3 rewritten in place as 4-bit codes.

_SPREAD = np.array([sum(((b >> j) & 1) << (8 * j) for j in range(8)) for b in range(256)], np.uint64)


@njit(cache=True, nogil=True)
def _to_nibbles(arena, units, md):
    """Planes 0-3 of matrix md in arena units[0..3] -> nibble rows (_nibble_addr): per 4 rows the same
    bytes, so the rewrite is in place (from a copy of those bytes; _nibble_rows' words)."""
    rb, poff = md[5], md[6]
    planes = np.empty((4, 4 * rb), np.uint8)
    P = _addr(planes)
    for k in range(md[0] // 4):
        s = poff + 4 * k * rb
        for p in range(4):
            planes[p] = arena[units[p], s:s + 4 * rb]
        for j in range(4):
            dst = arena[units[j], s:s + 4 * rb]
            for b in range(rb // 8):
                for h in range(4):
                    a = P + j * rb + 8 * b + h  # plane p's byte at a + 4 rb p
                    v = (_nibble_bits(a, 3) | _nibble_bits(a + 4 * rb, 2) | _nibble_bits(a + 8 * rb, 1)
                         | _nibble_bits(a + 12 * rb, 0))
                    for i in range(8):
                        dst[32 * b + 8 * h + i] = np.uint8((v >> np.uint64(8 * i)) & np.uint64(0xFF))


@njit(inline='always')
def _nibble_rows(CA, md, bits, o0, o1, out):
    """Rows o0..o1 of an msb matrix held as planes (chunk addresses at CA) as nibble codes of their top
    min(bits, 4) planes (zeros below; to_nibbles' order), row o at out[(o - o0) 4 rb]."""
    rb, poff = md[5], md[6]
    words = out.view(np.uint64)
    p0, p1 = _ldi(CA) + poff, _ldi(CA + 8) + poff  # loaded once: the stores below could alias CA
    p2 = _ldi(CA + 16) + poff if bits > 2 else 0
    p3 = _ldi(CA + 24) + poff if bits > 3 else 0
    for o in range(o0, o1):
        at = (o - o0) * rb // 2  # in words: 4 rb bytes per row
        for b in range(rb // 8):
            for h in range(4):  # out bytes 32b + 8h + i: weights 64b + 8h + i (low), + 32 (high)
                a = o * rb + 8 * b + h
                v = _nibble_bits(p0 + a, 3) | _nibble_bits(p1 + a, 2)
                if bits > 2:
                    v |= _nibble_bits(p2 + a, 1)
                    if bits > 3:
                        v |= _nibble_bits(p3 + a, 0)
                words[at + 4 * b + h] = v


@njit(inline='always')
def _nibble_bits(a, shift):
    """Plane bytes a (weights 8h..8h+7) and a + 4 (weights 8h+32..) spread into 8 nibble-code bytes, at
    bit `shift` of the low nibbles and shift + 4 of the high ones."""
    return (_SPREAD[_ldb(a)] << np.uint64(shift)) | (_SPREAD[_ldb(a + 4)] << np.uint64(shift + 4))


def nibble_form(layout: ExpertLayout) -> bool:
    """Whether resident experts of this layout run faster rewritten in nibble form (to_nibble_form):
    msb at group 128 on AVX2 without AVX-512 (simd.STRIDED), where the plane GEMV is bound by its bit
    transpose; every row count a multiple of 4."""
    return (STRIDED and layout.scheme == "msb" and layout.group == 128
            and all(o % 4 == 0 for _, (o, _n) in layout.matrices))


def to_nibble_form(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray) -> None:
    """Rewrite planes 0-3 of an expert held in arena units (its chunks 0..3) as nibble codes, in place;
    its metadata and planes 4.. are unchanged. Kernels then take it with form=NIBBLE_FORM (there is no
    way back: the runtime rewrites only experts that stay resident)."""
    units = np.asarray(units, dtype=np.int64)[:4]
    if not nibble_form(layout) or len(units) < 4 or (units < 0).any() or arena.dtype != np.uint8:
        raise UsageError(f"no nibble form for this layout on this CPU, or units {units} lack chunks 0..3")
    for md in _plan(layout).md.values():
        _to_nibbles(arena, units, md)


def lut_form(layout: ExpertLayout) -> bool:
    """Whether experts of this layout run at 2 bits faster rewritten in LUT form (to_lut_form): msb at
    group 128 on AVX2 without AVX-512 (simd.STRIDED); every row count a multiple of LUT_ROWS."""
    return (STRIDED and layout.scheme == "msb" and layout.group == 128
            and all(o % LUT_ROWS == 0 for _, (o, _n) in layout.matrices))


def to_lut_form(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, back: bool = False) -> None:
    """Rewrite planes 0-1 of an expert held in arena units (its chunks 0, 1) in LUT form, in place (back:
    the reverse): per block of LUT_ROWS rows and group of 128 inputs, a plane's 16 x 16 bytes transposed
    so that one 32-byte load holds plane bytes 2s and 2s + 1 of the 16 rows (_lut2_dot16), and the
    block's scales and minima by group, 16 rows side by side (_lut_transpose). Kernels then take it with
    form=LUT_FORM, at 2 bits; everything else in its chunks is unchanged."""
    units = np.asarray(units, dtype=np.int64)[:2]
    if not lut_form(layout) or len(units) < 2 or (units < 0).any() or arena.dtype != np.uint8:
        raise UsageError(f"no LUT form for this layout on this CPU, or units {units} lack chunks 0, 1")
    for md in _plan(layout).md.values():
        _lut_transpose(arena, units, md, back)


@njit(cache=True, nogil=True)
def _lut_transpose(arena, units, md, back):
    """Planes 0, 1 of matrix md: the bytes of row r, group g, byte j (plane form: r rb + 16 g + j) at
    256 g + 32 (j // 2) + 16 (j % 2) + r of each block of LUT_ROWS rows; its fp16 scales (chunk 0) and
    minima (chunk 1), [O, ng] row-major, at 16 g + r of each block's 16 ng: or back."""
    ng, rb, poff, moff = md[3], md[5], md[6], md[7]
    planes, meta = np.empty(LUT_ROWS * rb, np.int64), np.empty(LUT_ROWS * ng, np.int64)  # plane i -> LUT
    for r in range(LUT_ROWS):
        for g in range(ng):
            meta[r * ng + g] = 16 * g + r
            for j in range(16):
                planes[r * rb + 16 * g + j] = 256 * g + 32 * (j // 2) + 16 * (j % 2) + r
    for p in range(2):
        for b in range(md[0] // LUT_ROWS):
            s = poff + b * LUT_ROWS * rb
            _permute(arena[units[p], s:s + LUT_ROWS * rb], planes, back)
            s = moff + 2 * b * LUT_ROWS * ng
            _permute(arena[units[p], s:s + 2 * LUT_ROWS * ng].view(np.uint16), meta, back)


@njit(inline='always')
def _permute(a, order, back):
    """a[order[i]] = a[i] for every i, in place (back: a[i] = a[order[i]])."""
    was = a.copy()
    if back:
        a[:] = was[order]
    else:
        a[order] = was


def rewrite_form(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, old: int, new: int) -> None:
    """Turn an expert held in arena units from form `old` into `new`, in place: planes <-> LUT form,
    planes or LUT form -> nibble form (there is no way back from the nibble form)."""
    if old == new:
        return
    if old == NIBBLE_FORM or new not in _FORMS:
        raise UsageError(f"no rewrite from form {old} to form {new}")
    if old == LUT_FORM:
        to_lut_form(layout, arena, units, back=True)
    if new == NIBBLE_FORM:
        to_nibble_form(layout, arena, units)
    elif new == LUT_FORM:
        to_lut_form(layout, arena, units)


# ---------------------------------------------------------------------------------------------
# Registered ops (same signatures as kernels.reference).

_FORMS = {PLANE_FORM: "planes", NIBBLE_FORM: "nibble form", LUT_FORM: "LUT form"}


class _Plan(NamedTuple):
    """Per-layout constants of the kernels."""

    md: dict  # matrix name -> descriptor (int64 [8])
    starts: np.ndarray  # chunk offsets in a contiguous expert buffer (int64 [8])
    need: tuple  # need[b - 2]: bytes of b bits
    mwq: bool
    forms: int  # bit f set: this layout has form f on this CPU (PLANE_FORM, nibble_form, lut_form)


_PLANS: dict[int, tuple[ExpertLayout, _Plan]] = {}  # id -> (layout, plan); layouts live with models


def _plan(layout: ExpertLayout) -> _Plan:
    hit = _PLANS.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit[1]
    g = layout.group
    if g > MAX_GROUP:
        raise UsageError(f"group size {g} is above the cpu backend's limit of {MAX_GROUP}; "
                         f"convert with a smaller --group or use --backend reference")
    md = {}
    for name, (o, n) in layout.matrices:
        ng = num_groups(n, g)
        md[name] = np.array([o, n, g, ng, -(-ng // 16) * 16, ng * g // 8, layout.in_chunk(name, "planes"),
                             layout.in_chunk(name, "meta")], dtype=np.int64)
    plan = _Plan(md, np.asarray(layout.chunk_starts, dtype=np.int64), layout.level_ends, layout.scheme == "mwq",
                 1 << PLANE_FORM | nibble_form(layout) << NIBBLE_FORM | lut_form(layout) << LUT_FORM)
    _PLANS[id(layout)] = (layout, plan)
    return plan


def _check_bits(plan: _Plan, nbytes: int, bits: int, what: str) -> int:
    bits = int(bits)
    if not BASE_BITS <= bits <= MAX_BITS:
        raise UsageError(f"bits must be in {BASE_BITS}..{MAX_BITS}, got {bits}")
    if nbytes < plan.need[bits - BASE_BITS]:
        raise UsageError(f"{what} holds {nbytes} bytes, {bits} bits need {plan.need[bits - BASE_BITS]}")
    return bits


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _as_x(x, n: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x if x.dtype == torch.float32 else x.float()
        x = (x.detach() if x.requires_grad else x).numpy()  # each torch op costs ~5-10 us in a decode step
    else:
        x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != n:
        raise UsageError(f"x has shape {tuple(x.shape)}, expected [T, {n}]")
    return np.ascontiguousarray(x, dtype=np.float32)


def nested_matmul(layout: ExpertLayout, buf: np.ndarray, matrix: str, x: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W_b.T."""
    plan = _plan(layout)
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    bits = _check_bits(plan, buf.nbytes, bits, "expert buffer")
    return _matmul(plan, matrix, _address(buf) + plan.starts, bits, PLANE_FORM, x)


def nested_matmul_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, matrix: str,
                        x: torch.Tensor, bits: int, form: int = PLANE_FORM) -> torch.Tensor:
    """nested_matmul on an expert held as arena units (the expert cache's form) in `form` (PLANE_FORM;
    NIBBLE_FORM: rewritten by to_nibble_form; LUT_FORM: by to_lut_form, at 2 bits)."""
    plan = _plan(layout)
    ca = _checked_units(plan, arena, np.asarray(units, np.int64)[None], np.array([bits], np.int64),
                        np.array([form], np.int8))[0]
    return _matmul(plan, matrix, ca, int(bits), int(form), x)


def _matmul(plan: _Plan, matrix: str, ca: np.ndarray, bits: int, form: int, x) -> torch.Tensor:
    md = plan.md[matrix]
    xs = _as_x(x, int(md[1]))
    out = np.zeros((xs.shape[0], int(md[0])), dtype=np.float32)
    if xs.shape[0]:
        _matmul_kernel(ca, md, bits, plan.mwq, form, xs, _POWERS, out)
    return torch.from_numpy(out)


def byte_matmul(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W.T for W as 8-bit byte codes (see reference.byte_matmul)."""
    return _code_matmul(_byte_matmul_kernel, "byte", 1, 32, codes, scale, minimum, x)


def nibble_matmul(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W.T for W as 4-bit nibble codes (see reference.nibble_matmul)."""
    return _code_matmul(_nibble_matmul_kernel, "nibble", 2, 128, codes, scale, minimum, x)


@functools.cache
def _code_md(o: int, n: int, group: int, ng: int) -> np.ndarray:
    """The kernels' matrix descriptor of codes [O, ng*G] read with n inputs, shared by every call (the
    kernels never write it; a read-only array would be another numba type, compiled again)."""
    return np.array([o, n, group, ng, -(-ng // 16) * 16, 0, 0, 0], np.int64)


def _code_matmul(kernel, what: str, per_byte: int, unit: int, codes, scale, minimum, x) -> torch.Tensor:
    """x @ W.T on `kernel` for W as codes [O, ng*G / per_byte] with scale and minimum [O, ng]; G a
    multiple of unit, and x [T, N] must end in the last group."""
    o, ng = scale.shape
    width = per_byte * codes.shape[1]
    group = width // ng
    xs = _as_x(x, x.shape[-1])
    fits = width - group < xs.shape[1] <= width
    if codes.dtype != np.uint8 or codes.shape[0] != o or group % unit or not fits:
        raise UsageError(f"{what} codes {codes.dtype} {codes.shape} with scales {scale.shape} "
                         f"do not fit x {tuple(xs.shape)}")
    md = _code_md(o, xs.shape[1], group, ng)
    out = np.zeros((xs.shape[0], o), dtype=np.float32)
    if xs.shape[0]:
        kernel(codes, scale, minimum, xs, md, out)
    return torch.from_numpy(out)


def _ffn(plan: _Plan, cas: np.ndarray, bits: np.ndarray, x, ptr, tokens, weights, forms=None) -> np.ndarray:
    md_gu, md_dn = plan.md["gate_up"], plan.md["down"]
    xs = _as_x(x, int(md_gu[1]))
    out = np.zeros((xs.shape[0], int(md_dn[0])), dtype=np.float32)
    forms = np.zeros(len(cas), np.int8) if forms is None else forms
    if len(cas) and xs.shape[0]:
        _ffn_kernel(cas, np.asarray(bits, np.int64), forms, plan.mwq, xs, np.asarray(ptr, np.int64),
                    np.asarray(tokens, np.int64), np.asarray(weights, np.float32), md_gu, md_dn, _POWERS, out,
                    get_num_threads())
    return out


def _single(plan: _Plan, cas: np.ndarray, bits: int, x) -> torch.Tensor:
    T = x.shape[0]
    return torch.from_numpy(_ffn(plan, cas[None], np.array([bits]), x, np.array([0, T]), np.arange(T),
                                 np.ones(T, np.float32)))


def expert_ffn(layout: ExpertLayout, buf: np.ndarray, x: torch.Tensor, bits: int) -> torch.Tensor:
    """SwiGLU expert at `bits`: down(silu(gate(x)) * up(x)), x [T, D] -> [T, D]."""
    plan = _plan(layout)
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    bits = _check_bits(plan, buf.nbytes, bits, "expert buffer")
    return _single(plan, _address(buf) + plan.starts, bits, x)


def expert_ffn_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, x: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """expert_ffn on an expert whose chunk c lives in arena[units[c]] (the expert cache's form)."""
    plan = _plan(layout)
    bits = _check_bits(plan, plan.need[-1], bits, "layout")
    units = np.asarray(units, dtype=np.int64)[:MAX_BITS]
    if arena.dtype != np.uint8 or not arena.flags.c_contiguous or (units[:bits] < 0).any():
        raise UsageError(f"arena must be C-contiguous uint8 holding chunks 0..{bits - 1}; units {units}")
    return _single(plan, np.where(units >= 0, _address(arena) + units * arena.strides[0], 0), bits, x)


def moe_ffn_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, bits: np.ndarray,
                  x: torch.Tensor, ptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray,
                  form: np.ndarray | None = None) -> torch.Tensor:
    """A layer's active experts held as arena units, in one call (see reference.moe_ffn_units);
    form[j]: how entry j is held (PLANE_FORM, the default; NIBBLE_FORM: to_nibble_form, it then holds
    chunks 0..3; LUT_FORM: to_lut_form, at 2 bits; booleans read as nibble form or not)."""
    plan = _plan(layout)
    bits = np.asarray(bits, dtype=np.int64)
    units = np.asarray(units, dtype=np.int64).reshape(len(bits), -1)
    forms = np.zeros(len(bits), np.int8) if form is None else np.asarray(form, np.int8)
    cas = _checked_units(plan, arena, units, bits, forms)
    return torch.from_numpy(_ffn(plan, cas, bits, x, ptr, tokens, weights, forms))


def _checked_units(plan: _Plan, arena: np.ndarray, units: np.ndarray, bits: np.ndarray,
                   forms: np.ndarray) -> np.ndarray:
    """Chunk addresses [E, 8] of entries held as arena units [E, >= 8] (_unit_addresses), or a
    UsageError naming the first entry that cannot run."""
    if arena.dtype != np.uint8 or not arena.flags.c_contiguous:
        raise UsageError("arena must be a C-contiguous uint8 array")
    units = units[:, :MAX_BITS]
    cas, bad = _unit_addresses(units, bits, forms, plan.forms, arena)
    if bad >= 0 and units.shape[1] < MAX_BITS:
        raise UsageError(f"units must be {MAX_BITS} unit indices (-1: not held) per entry, got shape "
                         f"{units.shape}")
    if bad >= 0:
        f, has = int(forms[bad]), [n for k, n in _FORMS.items() if plan.forms >> k & 1]
        raise UsageError(f"entry {bad} at {bits[bad]} bits in form {f} ({_FORMS.get(f, 'unknown')}; this "
                         f"layout's forms on this CPU: {has}) "
                         f"lacks chunks, is out of range {BASE_BITS}..{MAX_BITS} or not 2 bits in LUT form: "
                         f"units {units[bad]}")
    return cas


@njit(cache=True)
def _unit_addresses(units, bits, forms, forms_ok, arena):
    """(chunk addresses [E, 8] of entries held in units of arena (C-contiguous uint8 [U, unit bytes]), 0
    where not held; -1, or the first entry whose bits are out of range, whose form this layout lacks
    (bit f of forms_ok), in LUT form at other than 2 bits, or that lacks a chunk it reads: 0..bits-1,
    and 0..3 in nibble form; 0 where units hold fewer than 8 per entry). One call: the same checks in
    numpy took ~40 us (and the arena's address from Python ~3 us)."""
    E, base, stride = units.shape[0], _addr(arena), arena.shape[1]
    cas = np.zeros((E, MAX_BITS), np.int64)
    if units.shape[1] < MAX_BITS:  # fewer than 8 per entry: rejected, never read past
        return cas, 0
    for j in range(E):
        b = bits[j]
        f = forms[j]
        if b < BASE_BITS or b > MAX_BITS or f < 0 or f > LUT_FORM or not (forms_ok >> f) & 1 or (
                f == LUT_FORM and b != 2):
            return cas, j
        need = max(b, 4) if f == NIBBLE_FORM else b
        for c in range(MAX_BITS):
            if units[j, c] >= 0:
                cas[j, c] = base + units[j, c] * stride
            elif c < need:
                return cas, j
    return cas, -1


def moe_ffn(layout: ExpertLayout, slab: np.ndarray, slots: np.ndarray, bits: np.ndarray,
            x: np.ndarray, ptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """All of a layer's active experts in one call (see reference.moe_ffn for the CSR contract)."""
    plan = _plan(layout)
    if slab.dtype != np.uint8 or slab.ndim != 2 or not slab.flags.c_contiguous:
        raise UsageError(f"slab must be a C-contiguous uint8 [S, B] array, got {slab.dtype} {slab.shape}")
    for b in np.asarray(bits).tolist():
        _check_bits(plan, slab.shape[1], b, "slab row")
    slots = np.asarray(slots, dtype=np.int64)
    return _ffn(plan, _address(slab) + slots[:, None] * slab.strides[0] + plan.starts, bits, x, ptr, tokens,
                weights)
