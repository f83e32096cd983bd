// Decode GEMV (T <= 2 tokens per expert) on nested bit-plane weights, on int8 tensor cores (sm_80+).
//
// Same op and inputs as nested_gemm_kernel (nested_gemm.cuh); one block computes one token.
//
// Weights are the B operand of mma.m16n8k32.s32.s8.u8 (8 output rows per warp, n = row): lane (row
// g, tig) owns 16 bytes of each plane row = one 128-input "span"; a warp's chunk is 4 spans (512
// inputs). Each warp streams its chunks through its own ring of `stages` shared-memory slots with
// cp.async (16 bytes per lane and plane, L2 only), so that stages - 1 chunks are in flight while
// one is decoded, whatever the registers allow; a lane reads back only what it copied itself, so the
// ring needs no barrier. Decode: a 32-bit plane word per plane (32 inputs) is bit-transposed into 8
// code words of 4 inputs (byte k of code word s = the code of input 8k + s, in its low bits) by
// pairs, nibbles, then bytes (one shift and one bit select per output word and stage): 28 integer
// ops per 32 weights at 4 bits, 48 at 8. msb: the b-bit code (plane 0 its top bit); mwq: the base
// code 2 b0 + b1 and one term per sign plane p >= 2 (its bit), each term its own mma and coefficient.
//
// The 4 lanes of an mma step hold 4 different spans (possibly 4 groups), so x (the A operand) is
// laid out per span: A row r holds span (r & 3)'s x only, digit r >> 2 (rows 8..11: digit 2), zero
// elsewhere; the int32 accumulator of row r then holds one span's sums, flushed into fp32 with its
// group's coefficient after every chunk. x is taken as 24-bit integers per span (a power-of-two scale
// puts max |x| in [2^21, 2^22)), split into three signed base-256 digits (error <= 2^-23 of the
// span's max |x|), prepared once per block into shared memory as ready A fragments: one 16-byte
// record per mma step for the lanes that feed a span (rows g < 4: digits 0 and 2; g >= 4: digit 1),
// a zero page for the others, so that each step is one LDS.128 straight into the mma operand.
//
// Instances per scheme and bit class (2..4, 2..6, 2..8 bits: a launch takes the class of its widest
// job), so that a 4-bit launch does not pay the registers of the 8-bit path. On sm_90 a launch may be
// a programmatic dependent of the kernel before it (launch.cu): until griddepcontrol.wait it only
// prefetches its first chunks and metadata into L2 (coherent, so safe even if that kernel writes
// them), then it reads x and writes out as usual.
#pragma once

#include "nested_gemm.cuh"

namespace edge_moe {

constexpr int kFastMaxT = 2;      // tokens per job the decode kernel serves (more: nested_gemm_kernel)
constexpr int kSpanWords = 136;   // shared words per span of x: 16 steps x 2 records x 4 words + 8 (136 = 8 mod 32)
constexpr int kZeroWords = 128;   // the zero page: A fragments of lanes that feed no x
constexpr int kGemvWarps = 8;     // most warps per block: kw k-parts x (nw / kw) row tiles of 8 rows
constexpr int kPlaneStage = 512;  // ring bytes per warp, plane and stage (32 lanes x 16 bytes)

// The instance serving a launch whose widest job has `max_bits` bits.
inline int gemv_class(int max_bits) { return max_bits <= 4 ? 4 : (max_bits <= 6 ? 6 : 8); }

cudaError_t launch_gemv_msb(const Params& p, const Jobs& j, dim3 grid, dim3 block, size_t smem, int bclass,
                            cudaStream_t stream);
cudaError_t launch_gemv_mwq(const Params& p, const Jobs& j, dim3 grid, dim3 block, size_t smem, int bclass,
                            cudaStream_t stream);
int occupancy_gemv_msb(int bclass, int threads, size_t smem);  // resident blocks per SM
int occupancy_gemv_mwq(int bclass, int threads, size_t smem);

// (a & m) | (b & ~m) for a constant m: one LOP3 (the compiler makes two of the plain expression)
template <uint32_t M>
__host__ __device__ __forceinline__ uint32_t bitsel(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;\n" : "=r"(d) : "r"(a), "r"(b), "n"(M));
  return d;
#else
  return (a & M) | (b & ~M);
#endif
}

// Code words of one 32-input word of NB planes: q[j] is the plane word whose bit is bit j of the code
// (q[j] = 0 for j >= NB, folded away). Byte k of c[s] = the code of input 8k + s, in its low NB bits;
// for NB = 3, 4, c[4..7] keep it in the high nibble (16 x the code: no shift; msb_term rescales).
// A bit-matrix transpose: pairs (input 2m, 2m + 1), then nibbles (4n .. 4n + 3), then bytes.
template <int NB>
__host__ __device__ __forceinline__ void swar_codes(const uint32_t (&q)[8], uint32_t (&c)[8]) {
  constexpr uint32_t m1 = 0x55555555u, m2 = 0x33333333u, m4 = 0x0F0F0F0Fu;
  if constexpr (NB <= 2) {
    const uint32_t a = bitsel<m1>(q[0], q[1] << 1), b = bitsel<m1>(q[0] >> 1, q[1]);  // pair m: 2m, 2m + 1
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      c[2 * s] = (a >> (2 * s)) & 0x03030303u;
      c[2 * s + 1] = (b >> (2 * s)) & 0x03030303u;
    }
  } else {
    const uint32_t a01 = bitsel<m1>(q[0], q[1] << 1), b01 = bitsel<m1>(q[0] >> 1, q[1]);
    const uint32_t a23 = bitsel<m1>(q[2], q[3] << 1), b23 = bitsel<m1>(q[2] >> 1, q[3]);
    const uint32_t e = bitsel<m2>(a01, a23 << 2), f = bitsel<m2>(a01 >> 2, a23);  // nibble n: 4n, 4n + 2
    const uint32_t g = bitsel<m2>(b01, b23 << 2), h = bitsel<m2>(b01 >> 2, b23);  // 4n + 1, 4n + 3
    if constexpr (NB <= 4) {
      c[0] = e & m4, c[4] = e & ~m4, c[2] = f & m4, c[6] = f & ~m4;
      c[1] = g & m4, c[5] = g & ~m4, c[3] = h & m4, c[7] = h & ~m4;
    } else {
      const uint32_t a45 = bitsel<m1>(q[4], q[5] << 1), b45 = bitsel<m1>(q[4] >> 1, q[5]);
      const uint32_t a67 = bitsel<m1>(q[6], q[7] << 1), b67 = bitsel<m1>(q[6] >> 1, q[7]);
      const uint32_t e2 = bitsel<m2>(a45, a67 << 2), f2 = bitsel<m2>(a45 >> 2, a67);
      const uint32_t g2 = bitsel<m2>(b45, b67 << 2), h2 = bitsel<m2>(b45 >> 2, b67);
      c[0] = bitsel<m4>(e, e2 << 4), c[4] = bitsel<m4>(e >> 4, e2);
      c[2] = bitsel<m4>(f, f2 << 4), c[6] = bitsel<m4>(f >> 4, f2);
      c[1] = bitsel<m4>(g, g2 << 4), c[5] = bitsel<m4>(g >> 4, g2);
      c[3] = bitsel<m4>(h, h2 << 4), c[7] = bitsel<m4>(h >> 4, h2);
    }
  }
}

#ifdef __CUDACC__

// acc (16 x 8 int32) += A (16 x 32 s8, x digits) * B (32 x 8 u8, weight codes)
__device__ __forceinline__ void imma(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                     uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

// msb, one chunk of a lane (4 words of 32 inputs, 16 mma steps): the b-bit code of every weight.
// xrec: the lane's A fragments, one 16-byte record per step, 8 words apart.
// For 3 and 4 bits, steps 2 and 3 (code words 4..7, 16 x the code) go to a second accumulator.
template <int BITS>
__device__ __forceinline__ void msb_term(int (&acc)[4], const uint4 (&pw)[BITS], const uint32_t* xrec) {
  constexpr bool kHi = BITS == 3 || BITS == 4;
  int hi[4] = {0, 0, 0, 0};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t q[8], c[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) q[j] = j < BITS ? word_of(pw[j < BITS ? BITS - 1 - j : 0], w) : 0u;
    swar_codes<BITS>(q, c);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // step j: code words 2j (k rows 0..15) and 2j + 1 (k rows 16..31)
      const uint4 a = *reinterpret_cast<const uint4*>(xrec + 8 * (4 * w + j));
      imma(kHi && j >= 2 ? hi : acc, a.x, a.y, a.z, a.w, c[2 * j], c[2 * j + 1]);
    }
  }
  if constexpr (kHi) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += hi[i] >> 4;  // exact: every term of hi is a multiple of 16
  }
}

// y[i] += coefficient of its output row * x scale * acc[i] (acc 0, 2: row 2 tig; 1, 3: row 2 tig + 1)
__device__ __forceinline__ void add_term(float (&y)[4], const int (&acc)[4], float fa, float fb) {
  y[0] = fmaf(fa, static_cast<float>(acc[0]), y[0]);
  y[1] = fmaf(fb, static_cast<float>(acc[1]), y[1]);
  y[2] = fmaf(fa, static_cast<float>(acc[2]), y[2]);
  y[3] = fmaf(fb, static_cast<float>(acc[3]), y[3]);
}

// mwq: the base code (planes 0, 1 as 2 b0 + b1) and one term per sign plane p >= 2 (its bit), each
// into its own accumulator, all from one x load per mma step.
template <int BITS>
__device__ __forceinline__ void mwq_terms(int (&acc)[BITS - 1][4], const uint4 (&pw)[BITS], const uint32_t* xrec) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t q[8] = {word_of(pw[1], w), word_of(pw[0], w), 0u, 0u, 0u, 0u, 0u, 0u};
    uint32_t c[8], sg[BITS];
    swar_codes<2>(q, c);
#pragma unroll
    for (int k = 2; k < BITS; ++k) sg[k] = word_of(pw[k], w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint4 a = *reinterpret_cast<const uint4*>(xrec + 8 * (4 * w + j));
      imma(acc[0], a.x, a.y, a.z, a.w, c[2 * j], c[2 * j + 1]);
#pragma unroll
      for (int k = 2; k < BITS; ++k)
        imma(acc[k - 1], a.x, a.y, a.z, a.w, (sg[k] >> (2 * j)) & 0x01010101u, (sg[k] >> (2 * j + 1)) & 0x01010101u);
    }
  }
}

// One chunk (4 spans) of a warp: all terms, then the offset term. m0 / m1: metadata halves of the
// lane's output rows (2 tig, 2 tig + 1) at the group of its accumulators' span, arrays astr apart.
template <int SCHEME, int BITS>
__device__ __forceinline__ void gemv_chunk(float (&y)[4], float (&yo)[2], const uint4 (&pw)[BITS],
                                           const uint32_t* xrec, const float2 xst, const __half* m0,
                                           const __half* m1, int astr) {
  const float sa = __half2float(m0[0]), sb = __half2float(m1[0]);        // scale
  const float na = __half2float(m0[astr]), nb = __half2float(m1[astr]);  // minimum
  if constexpr (SCHEME == kMsb) {  // w = scale * 2^(8 - b) * (b-bit code) + offset
    int acc[4] = {0, 0, 0, 0};
    msb_term<BITS>(acc, pw, xrec);
    const float f = xst.x * static_cast<float>(1 << (8 - BITS));
    add_term(y, acc, sa * f, sb * f);
    constexpr float centre = ((1 << (8 - BITS)) - 1) * 0.5f;
    yo[0] = fmaf(fmaf(sa, centre, na), xst.y, yo[0]);
    yo[1] = fmaf(fmaf(sb, centre, nb), xst.y, yo[1]);
  } else {  // w = 2 s b0 + s b1 + sum_p 2 alpha_p bit_p + min - sum_p alpha_p
    int acc[BITS - 1][4];
#pragma unroll
    for (int k = 0; k < BITS - 1; ++k) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0;
    mwq_terms<BITS>(acc, pw, xrec);
    const float f = xst.x;
    add_term(y, acc[0], sa * f, sb * f);
    float suma = 0.f, sumb = 0.f;
#pragma unroll
    for (int k = 2; k < BITS; ++k) {
      const float aa = __half2float(m0[k * astr]), ab = __half2float(m1[k * astr]);
      suma += aa;
      sumb += ab;
      add_term(y, acc[k - 1], 2.f * aa * f, 2.f * ab * f);
    }
    yo[0] = fmaf(na - suma, xst.y, yo[0]);
    yo[1] = fmaf(nb - sumb, xst.y, yo[1]);
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of 16 bytes into L2 only (.cg); "memory": stays after the reads of the slot it overwrites.
// No L2::cache_hint operand: with it, nvcc 13.0's ptxas encoded some of these (shared address with a
// uniform offset) as LDGSTS [R+UR0], desc[UR1], which faulted with an illegal instruction on an H100.
__device__ __forceinline__ void cp_async16_ring(uint32_t dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}

// Wait until at most n (0..4) of this thread's cp.async groups are pending; "memory": later shared
// reads stay after it.
__device__ __forceinline__ void cp_async_wait_n(int n) {
#if __CUDA_ARCH__ >= 800
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
  }
#endif
}

__device__ __forceinline__ void grid_dep_wait() {  // no-op unless launched as a programmatic dependent
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dep_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The lane's plane words of one span into ring slot `dst` (planes kPlaneStage bytes apart; padding
// spans past the block's range re-read its last span: x is zero there).
template <int BITS>
__device__ __forceinline__ void ring_load(uint32_t dst, const uint8_t* const (&pl)[BITS], long long off) {
#pragma unroll
  for (int i = 0; i < BITS; ++i) cp_async16_ring(dst + i * kPlaneStage, pl[i] + off);
}

// v[2 k + h] = x[row, e0 + 8 k + h] (k = 0..3, h = 0, 1), zeros past N or when !valid; straight-line
// loads when the unit is in range (one dtype branch), element by element otherwise.
__device__ __forceinline__ void load_unit8(const Params& p, long long row, int e0, bool valid, float (&v)[8]) {
  if (valid && e0 + 25 < p.N) {
    const long long i = row * p.ldx + e0;
    if (p.swiglu && p.xdtype == kF32) {  // down of an expert: silu(h[:, :N]) * h[:, N:], h float32
      const float* g = static_cast<const float*>(p.x) + i;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float a = g[8 * (k >> 1) + (k & 1)], b = g[8 * (k >> 1) + (k & 1) + p.N];
        v[k] = a / (1.f + expf(-a)) * b;
      }
      return;
    }
    if (!p.swiglu && p.xdtype == kF16) {
      const __half* x = static_cast<const __half*>(p.x) + i;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = __half2float(x[8 * (k >> 1) + (k & 1)]);
      return;
    }
    if (!p.swiglu && p.xdtype == kF32) {
      const float* x = static_cast<const float*>(p.x) + i;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = x[8 * (k >> 1) + (k & 1)];
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = valid ? load_x(p, row, e0 + 8 * (k >> 1) + (k & 1)) : 0.f;
}

// Unit q of the x preparation (span q >> 4, step q & 15; 16 lanes per span): its 8 values v into digits.
__device__ __forceinline__ void gemv_prep_unit(uint32_t* xa, float2* xst, int q, int nsl4, const float (&v)[8]) {
  const int ls = q >> 4, st = q & 15;
  const bool live = ls < nsl4;
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[i]));
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const int ex = max(((__float_as_int(m) >> 23) & 255) - 126, -100);  // m = f 2^ex, f in [0.5, 1)
  const float inv = m > 0.f ? __int_as_float((149 - ex) << 23) : 0.f;  // 2^(22 - ex)
  const float xs = m > 0.f ? __int_as_float((ex + 105) << 23) : 0.f;   // 2^(ex - 22)
  // round(v * inv) + 0x808080 with one FMA: the bytes are then the 3 digits + 128 (balanced base 256)
  uint32_t u[8];
  int sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    u[i] = static_cast<uint32_t>(__float_as_int(fmaf(v[i], inv, 12582912.f))) - 0x4ABF7F80u;
    sum += static_cast<int>(u[i]) - 0x808080;
  }
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (live) {
    uint32_t d[3][2];  // [digit][lo, hi]: bytes k = inputs u[2k + h]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t p01 = __byte_perm(u[h], u[2 + h], 0x5410), p23 = __byte_perm(u[4 + h], u[6 + h], 0x5410);
      const uint32_t q01 = __byte_perm(u[h], u[2 + h], 0x0062), q23 = __byte_perm(u[4 + h], u[6 + h], 0x0062);
      d[0][h] = __byte_perm(p01, p23, 0x6420) ^ 0x80808080u;  // digit 0 (x 1)
      d[1][h] = __byte_perm(p01, p23, 0x7531) ^ 0x80808080u;  // digit 1 (x 256)
      d[2][h] = __byte_perm(q01, q23, 0x5410) ^ 0x80808080u;  // digit 2 (x 65536)
    }
    uint4* rec = reinterpret_cast<uint4*>(xa + ls * kSpanWords + 8 * st);
    rec[0] = make_uint4(d[0][0], d[2][0], d[0][1], d[2][1]);
    rec[1] = make_uint4(d[1][0], 0u, d[1][1], 0u);
    if (st == 0) xst[ls] = make_float2(xs, xs * static_cast<float>(sum));
  }
}

// x of token-list row r, spans [sA, sB) (padded to whole chunks with zeros), into shared memory as A
// fragments: span ls, step st = (w, j) holds inputs 32 w + 8 k + 2 j (lo) and + 1 (hi) at byte k, in
// record 0 {digit 0 lo, digit 2 lo, digit 0 hi, digit 2 hi} and record 1 {digit 1 lo, 0, digit 1 hi, 0};
// xst[span] = (scale, sum of the quantized x). 16 lanes per span.
__device__ __forceinline__ void gemv_prep_x(const Params& p, uint32_t* xa, float2* xst, int r, int sA,
                                            int sB, int nsl4) {
  const int lane = threadIdx.x & 31;
  const long long xr = x_row(p, r);
  for (int i = threadIdx.x; i < kZeroWords; i += blockDim.x) xa[nsl4 * kSpanWords + i] = 0u;
  for (int base = (threadIdx.x >> 5) * 32; base < nsl4 * 16; base += blockDim.x) {  // warp-uniform
    const int q = base + lane, ls = q >> 4, st = q & 15;
    const bool valid = ls < nsl4 && sA + ls < sB;
    float v[8];  // v[2 k + h] = x[e0 + 8 k + h]
    load_unit8(p, xr, (sA + ls) * 128 + 32 * (st >> 2) + 2 * (st & 3), valid, v);
    gemv_prep_unit(xa, xst, q, nsl4, v);
  }
}

__device__ __forceinline__ void put_out(const Params& p, int row, int r, float v) {
  const long long orow = p.oidx ? static_cast<long long>(p.oidx[r]) : static_cast<long long>(r);
  if (p.ow) v *= p.ow[r];
  float* dst = p.out + orow * p.ldo + row;
  if (p.atomic) atomicAdd(dst, v);
  else *dst = v;
}

// L2 prefetch of what a block reads first (sm_90; before griddepcontrol.wait, so never into L1 or
// shared memory): the warp's first `stages` chunks of its plane rows (one bulk prefetch per row and
// plane) and the block's metadata rows.
template <int BITS, int NARR>
__device__ __forceinline__ void gemv_prefetch(const Params& p, const Jobs& jobs, int job, int trow, int span0,
                                              int nspans, int brow0, int mrows, long long gA, int ngb) {
#if __CUDA_ARCH__ >= 900
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (nspans > 0) {
    for (int i = lane; i < 8 * BITS; i += 32) {
      const uint8_t* a = chunk_ptr(p, jobs, job, i >> 3) + p.plane_off +
                         static_cast<long long>(min(trow + (i & 7), p.O - 1)) * p.row_bytes + 16LL * span0;
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(a), "r"(16 * nspans) : "memory");
    }
  }
  for (int rr = warp; rr < mrows; rr += p.nw) {
    const long long h0 = static_cast<long long>(min(brow0 + rr, p.O - 1)) * p.ng + gA;
    const long long b0 = 2 * h0, b1 = 2 * (h0 + ngb);  // byte range of the row's halves
    for (int i = lane; i < NARR * 8; i += 32) {  // up to 8 lines of 128 bytes per array
      const long long at = (b0 & ~127LL) + 128LL * (i & 7);
      if (at < b1) {
        const uint8_t* src = chunk_ptr(p, jobs, job, i >> 3) + p.meta_off + at;
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(src) : "memory");
      }
    }
  }
#endif
}

// Block: row tiles [rtg * rbn, +rbn) of 8 rows x kw k-parts (warp = rb * kw + k part, p.nw warps),
// spans of k part ks, token-list row r of job `job`.
template <int SCHEME, int BITS>
__device__ void gemv_body(const Params& p, const Jobs& jobs, int job, int r, int rtg, int ks) {
#if __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int NARR = SCHEME == kMsb ? 2 : BITS;  // scale, minimum (, alpha of planes 2..): chunk a
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int kwn = p.kw, rbn = p.nw / kwn, rb = warp / kwn, kw = warp - rb * kwn;
  const int gs = 1 << p.gshift;  // spans per group
  const int sA = ks * p.spb, sB = min(p.nsp, sA + p.spb), nsl4 = (sB - sA + 3) & ~3, ncb = nsl4 >> 2;
  const int gA = sA >> p.gshift, ngb = ((sB + gs - 1) >> p.gshift) - gA;
  const int mrows = rbn * 8, brow0 = rtg * mrows, trow = brow0 + rb * 8;
  uint32_t* xa = reinterpret_cast<uint32_t*>(smem);
  float2* xst = reinterpret_cast<float2*>(smem + p.xa_bytes);
  uint32_t* meta = reinterpret_cast<uint32_t*>(smem + p.xa_bytes + p.xst_bytes);
  float* red = reinterpret_cast<float*>(smem + p.xa_bytes + p.xst_bytes + p.meta_bytes);
  const int S = p.stages;
  unsigned char* ring = smem + p.ring_off + warp * (S * p.ring_bits * kPlaneStage) + 16 * lane;  // the lane's slots

  const int cA = kw * ncb / kwn, cB = (kw + 1) * ncb / kwn;  // the warp's chunks
  const bool tile_on = trow < p.O;
  const long long roff = static_cast<long long>(min(trow + gid, p.O - 1)) * p.row_bytes;
  const uint8_t* pl[BITS];  // the lane's plane rows
#pragma unroll
  for (int i = 0; i < BITS; ++i) pl[i] = chunk_ptr(p, jobs, job, i) + p.plane_off + roff;
  auto span_off = [&](int c) { return 16LL * min(sA + 4 * c + tig, sB - 1); };

  if (p.pdl) {
    const int span0 = sA + 4 * cA, nspans = tile_on ? min(sB, sA + 4 * min(cA + S, cB)) - span0 : 0;
    gemv_prefetch<BITS, NARR>(p, jobs, job, trow, span0, nspans, brow0, mrows, gA, ngb);
  }
  grid_dep_wait();    // the kernel before this one is complete: x and out may be touched
  grid_dep_launch();  // the next may start its prologue

  // metadata of the block's rows and groups -> shared memory (4-byte words covering each row's range)
#pragma unroll 1
  for (int a = 0; a < NARR; ++a) {
    const uint8_t* src = chunk_ptr(p, jobs, job, a) + p.meta_off;
    for (int rr = warp; rr < mrows; rr += p.nw) {
      const long long h0 = static_cast<long long>(min(brow0 + rr, p.O - 1)) * p.ng + gA;
      const int nw = static_cast<int>(((h0 + ngb - 1) >> 1) - (h0 >> 1)) + 1;
      for (int j = lane; j < nw; j += 32) cp_async4(meta + (a * mrows + rr) * p.mw + j, src + 4 * ((h0 >> 1) + j));
    }
  }
  cp_async_commit();

  // the warp's first chunk in flight while x is prepared, then the rest of the ring (one cp.async group
  // per chunk, empty ones too): x's loads queue behind one chunk only, not S
  const uint32_t ring_s = smem_u32(ring);
  if (tile_on && cA < cB) ring_load<BITS>(ring_s, pl, span_off(cA));
  cp_async_commit();
  gemv_prep_x(p, xa, xst, r, sA, sB, nsl4);
  for (int st = 1; st < S; ++st) {
    if (tile_on && cA + st < cB) ring_load<BITS>(ring_s + st * BITS * kPlaneStage, pl, span_off(cA + st));
    cp_async_commit();
  }
  cp_async_wait_n(S);  // the metadata group (older than the S ring groups) has landed
  __syncthreads();

  float y[4] = {0.f, 0.f, 0.f, 0.f}, yo[2] = {0.f, 0.f};
  if (tile_on) {
    const int s = gid & 3;                // span (in the chunk) of the lane's accumulators
    const bool xl = s == tig;             // lanes that feed x (their own span) to A rows g, g + 8
    const uint32_t* xrec0 = xl ? xa + tig * kSpanWords + (gid >> 2) * 4 : xa + nsl4 * kSpanWords;
    const int xstep = xl ? 4 * kSpanWords : 0;  // per chunk
    const int ra = rb * 8 + 2 * tig;      // block-local output rows of the accumulators
    const int pa = static_cast<int>((static_cast<long long>(min(brow0 + ra, p.O - 1)) * p.ng + gA) & 1);
    const int pb = static_cast<int>((static_cast<long long>(min(brow0 + ra + 1, p.O - 1)) * p.ng + gA) & 1);
    const __half* mh = reinterpret_cast<const __half*>(meta);
    const __half* ma = mh + ra * 2 * p.mw + pa;
    const __half* mb = mh + (ra + 1) * 2 * p.mw + pb;
    const int astr = mrows * 2 * p.mw;
    int st = 0;
    for (int c = cA; c < cB; ++c) {
      cp_async_wait_n(S - 1);  // chunk c (the oldest of S groups) has landed
      uint4 pw[BITS];
#pragma unroll
      for (int i = 0; i < BITS; ++i) pw[i] = *reinterpret_cast<const uint4*>(ring + (st * BITS + i) * kPlaneStage);
      const int gl = min((4 * c + s) >> p.gshift, ngb - 1);  // padding spans: any finite coefficient
      gemv_chunk<SCHEME, BITS>(y, yo, pw, xrec0 + c * xstep, xst[4 * c + s], ma + gl, mb + gl, astr);
      if (c + S < cB) ring_load<BITS>(ring_s + st * BITS * kPlaneStage, pl, span_off(c + S));
      cp_async_commit();
      st = st + 1 == S ? 0 : st + 1;
    }
  }
  // A row g holds digit g >> 2 (weight 256^digit), row g + 8 digit 2 (g < 4) or nothing; the offset
  // term of a span is counted by the lanes g < 4 only.
  const float wl = gid < 4 ? 1.f : 256.f, wh = gid < 4 ? 65536.f : 0.f, wo = gid < 4 ? 1.f : 0.f;
  float va = wl * y[0] + wh * y[2] + wo * yo[0];
  float vb = wl * y[1] + wh * y[3] + wo * yo[1];
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    va += __shfl_xor_sync(0xffffffffu, va, o);
    vb += __shfl_xor_sync(0xffffffffu, vb, o);
  }
  if (gid == 0) {
    red[warp * 8 + 2 * tig] = va;
    red[warp * 8 + 2 * tig + 1] = vb;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < mrows) {  // sum the k parts of each row
    const int rr = threadIdx.x, rbx = rr >> 3;
    float v = 0.f;
    for (int k = 0; k < kwn; ++k) v += red[(rbx * kwn + k) * 8 + (rr & 7)];
    if (brow0 + rr < p.O) put_out(p, brow0 + rr, r, v);
  }
#endif
}

// grid: x = row-tile group * ksplit + k part, y = token of the job, z = job. BMAX: the bit class
// (the launch's jobs have 2..BMAX bits).
template <int SCHEME, int BMAX>
__global__ void __launch_bounds__(32 * kGemvWarps, 2) gemv_kernel(const Params p, const Jobs jobs) {
  const int job = blockIdx.z, tok = blockIdx.y;
  if (tok >= jobs.count[job]) return;
  const int rtg = blockIdx.x / p.ksplit, ks = blockIdx.x - rtg * p.ksplit;
  const int r = jobs.row0[job] + tok, b = jobs.bits[job];
  if (b <= 4) {
    if (b == 2) gemv_body<SCHEME, 2>(p, jobs, job, r, rtg, ks);
    else if (b == 3) gemv_body<SCHEME, 3>(p, jobs, job, r, rtg, ks);
    else gemv_body<SCHEME, 4>(p, jobs, job, r, rtg, ks);
    return;
  }
  if constexpr (BMAX >= 6) {
    if (b <= 6) {
      if (b == 5) gemv_body<SCHEME, 5>(p, jobs, job, r, rtg, ks);
      else gemv_body<SCHEME, 6>(p, jobs, job, r, rtg, ks);
      return;
    }
  }
  if constexpr (BMAX >= 8) {
    if (b == 7) gemv_body<SCHEME, 7>(p, jobs, job, r, rtg, ks);
    else gemv_body<SCHEME, 8>(p, jobs, job, r, rtg, ks);
  }
}

template <int SCHEME, int BMAX>
cudaError_t configure_gemv() {
  static unsigned configured = 0;
  return raise_smem_limit(gemv_kernel<SCHEME, BMAX>, configured);
}

// p.pdl: launched as a programmatic dependent of the stream's previous kernel (sm_90).
template <int SCHEME, int BMAX>
cudaError_t launch_gemv_bmax(const Params& p, const Jobs& j, dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  const cudaError_t e = configure_gemv<SCHEME, BMAX>();
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, gemv_kernel<SCHEME, BMAX>, p, j);
}

template <int SCHEME>
cudaError_t launch_gemv(const Params& p, const Jobs& j, dim3 grid, dim3 block, size_t smem, int bclass,
                        cudaStream_t stream) {
  if (bclass <= 4) return launch_gemv_bmax<SCHEME, 4>(p, j, grid, block, smem, stream);
  if (bclass <= 6) return launch_gemv_bmax<SCHEME, 6>(p, j, grid, block, smem, stream);
  return launch_gemv_bmax<SCHEME, 8>(p, j, grid, block, smem, stream);
}

template <int SCHEME, int BMAX>
int occupancy_gemv_bmax(int threads, size_t smem) {
  int blocks = 0;
  if (configure_gemv<SCHEME, BMAX>() != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gemv_kernel<SCHEME, BMAX>, threads, smem) != cudaSuccess)
    return 0;
  return blocks;
}

template <int SCHEME>
int occupancy_gemv(int bclass, int threads, size_t smem) {
  if (bclass <= 4) return occupancy_gemv_bmax<SCHEME, 4>(threads, smem);
  if (bclass <= 6) return occupancy_gemv_bmax<SCHEME, 6>(threads, smem);
  return occupancy_gemv_bmax<SCHEME, 8>(threads, smem);
}

#endif  // __CUDACC__

}  // namespace edge_moe
