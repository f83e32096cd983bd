// Decode GEMV (T <= 2 tokens per expert) on nested bit-plane weights, on int8 tensor cores (sm_80+).
//
// Same op and inputs as nested_gemm_kernel (nested_gemm.cuh); one block computes one token.
//
// Weights are the B operand of mma.m16n8k32.s32.s8.u8 (8 output rows per warp, n = row), read
// straight from DRAM into registers: lane (row g, tig) loads 16 bytes of each plane row = one
// 128-input "span", its own; the next chunk (4 spans: 512 inputs) is in flight while the current
// one is decoded. A 32-bit plane word (32 inputs) gives 8 code words of 4 inputs (8k + t, k = 0..3)
// with one bit select per further plane, one rotate and one AND per code word: msb codes are the top
// b bits of the 8-bit code (plane p at bit 7 - p); mwq has a 2-bit base code and one term per sign
// plane (bit 7), each term its own mma and coefficient. About (b + 1) / 4 integer ops per weight.
//
// The 4 lanes of an mma step hold 4 different spans (possibly 4 groups), so x (the A operand) is
// laid out per span: A row r holds span (r & 3)'s x only, digit r >> 2 (rows 8..11: digit 2), zero
// elsewhere; the int32 accumulator of row r then holds one span's sums, flushed into fp32 with its
// group's coefficient after every chunk. x is taken as 24-bit integers per span (a power-of-two scale
// puts max |x| in [2^21, 2^22)), split into three signed base-256 digits (error <= 2^-23 of the
// span's max |x|), prepared once per block into shared memory as ready A fragments: one 16-byte
// record per mma step for the lanes that feed a span (rows g < 4: digits 0 and 2; g >= 4: digit 1),
// a zero page for the others, so that each step is one LDS.128 straight into the mma operand.
#pragma once

#include "nested_gemm.cuh"

namespace edge_moe {

constexpr int kFastMaxT = 2;      // tokens per job the decode kernel serves (more: nested_gemm_kernel)
constexpr int kSpanWords = 136;   // shared words per span of x: 16 steps x 2 records x 4 words + 8 (136 = 8 mod 32)
constexpr int kZeroWords = 128;   // the zero page: A fragments of lanes that feed no x
constexpr int kGemvWarps = 8;     // warps per block: kw k-parts x (8 / kw) row tiles of 8 rows

cudaError_t launch_gemv_msb(const Params& p, const Jobs& j, dim3 grid, size_t smem, cudaStream_t stream);
cudaError_t launch_gemv_mwq(const Params& p, const Jobs& j, dim3 grid, size_t smem, cudaStream_t stream);
int occupancy_gemv_msb(size_t smem);  // resident blocks per SM
int occupancy_gemv_mwq(size_t smem);

#ifdef __CUDACC__

__device__ __forceinline__ uint32_t rotl(uint32_t x, int n) { return __funnelshift_l(x, x, n); }

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

// Code word t (0..7) of planes u[0..NP-1] (u[i] = plane word rotated left by 7 - i): byte k holds
// input 8k + t with plane i at bit 7 - i, the other bits zero. One AND or OR-AND per plane, one rotate.
template <int NP>
__device__ __forceinline__ uint32_t code_word(const uint32_t (&u)[NP], int t) {
  uint32_t c;
  if constexpr (NP == 8) {  // every bit is some plane's: start from plane 0 unmasked, select the others
    c = u[0];
#pragma unroll
    for (int i = 1; i < NP; ++i) {
      const uint32_t m = rotl_c(0x01010101u, (t + 7 - i) & 31);
      c = (c & ~m) | (u[i] & m);
    }
  } else {
    c = u[0] & rotl_c(0x01010101u, (t + 7) & 31);
#pragma unroll
    for (int i = 1; i < NP; ++i) c |= u[i] & rotl_c(0x01010101u, (t + 7 - i) & 31);
  }
  return t ? rotr(c, t) : c;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

// One term over a lane's 128 inputs (16 mma steps): planes P0..P0+NP-1 merged into one code.
// xrec: the lane's A fragments, one 16-byte record per step, 8 words apart.
template <int BITS, int P0, int NP>
__device__ __forceinline__ void term_mma(int (&acc)[4], const uint4 (&pw)[BITS], const uint32_t* xrec) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t u[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const uint32_t v = word_of(pw[P0 + i], w);
      u[i] = i == 7 ? v : rotl(v, 7 - i);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // code words 2j (k rows 0..15) and 2j + 1 (k rows 16..31)
      const uint4 a = *reinterpret_cast<const uint4*>(xrec + 8 * (4 * w + j));
      imma(acc, a.x, a.y, a.z, a.w, code_word<NP>(u, 2 * j), code_word<NP>(u, 2 * j + 1));
    }
  }
}

// y[i] += coefficient of its output row * x scale * acc[i] (acc 0, 2: row 2 tig; 1, 3: row 2 tig + 1)
__device__ __forceinline__ void add_term(float (&y)[4], const int (&acc)[4], float fa, float fb) {
  y[0] = fmaf(fa, static_cast<float>(acc[0]), y[0]);
  y[1] = fmaf(fb, static_cast<float>(acc[1]), y[1]);
  y[2] = fmaf(fa, static_cast<float>(acc[2]), y[2]);
  y[3] = fmaf(fb, static_cast<float>(acc[3]), y[3]);
}

// mwq: the base code (planes 0, 1 as 64 (2 b0 + b1)) and one term per sign plane p >= 2 (128 bit),
// each into its own accumulator, all from one x load per mma step.
template <int BITS>
__device__ __forceinline__ void mwq_terms(int (&acc)[BITS - 1][4], const uint4 (&pw)[BITS], const uint32_t* xrec) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t ub[2] = {rotl(word_of(pw[0], w), 7), rotl(word_of(pw[1], w), 6)};
    uint32_t us[BITS];
#pragma unroll
    for (int k = 2; k < BITS; ++k) us[k] = rotl(word_of(pw[k], w), 7);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint4 a = *reinterpret_cast<const uint4*>(xrec + 8 * (4 * w + j));
      imma(acc[0], a.x, a.y, a.z, a.w, code_word<2>(ub, 2 * j), code_word<2>(ub, 2 * j + 1));
#pragma unroll
      for (int k = 2; k < BITS; ++k) {
        const uint32_t u1[1] = {us[k]};
        imma(acc[k - 1], a.x, a.y, a.z, a.w, code_word<1>(u1, 2 * j), code_word<1>(u1, 2 * j + 1));
      }
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
  if constexpr (SCHEME == kMsb) {  // w = scale * (top b bits of the 8-bit code) + offset
    int acc[4] = {0, 0, 0, 0};
    term_mma<BITS, 0, BITS>(acc, pw, xrec);
    add_term(y, acc, sa * xst.x, sb * xst.x);
    constexpr float centre = ((1 << (8 - BITS)) - 1) * 0.5f;
    yo[0] = fmaf(fmaf(sa, centre, na), xst.y, yo[0]);
    yo[1] = fmaf(fmaf(sb, centre, nb), xst.y, yo[1]);
  } else {  // w = 2 s b0 + s b1 + sum_p 2 alpha_p bit_p + min - sum_p alpha_p
    int acc[BITS - 1][4];
#pragma unroll
    for (int k = 0; k < BITS - 1; ++k) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0;
    mwq_terms<BITS>(acc, pw, xrec);
    const float f = xst.x * (1.f / 64.f);
    add_term(y, acc[0], sa * f, sb * f);
    float suma = 0.f, sumb = 0.f;
#pragma unroll
    for (int k = 2; k < BITS; ++k) {
      const float aa = __half2float(m0[k * astr]), ab = __half2float(m1[k * astr]);
      suma += aa;
      sumb += ab;
      add_term(y, acc[k - 1], aa * f, ab * f);
    }
    yo[0] = fmaf(na - suma, xst.y, yo[0]);
    yo[1] = fmaf(nb - sumb, xst.y, yo[1]);
  }
}

// The lane's plane words of one span (padding spans past the block's range re-read its last span: x
// is zero there).
template <int BITS>
__device__ __forceinline__ void gemv_load(uint4 (&w)[BITS], const uint8_t* const (&pl)[BITS], long long off) {
#pragma unroll
  for (int i = 0; i < BITS; ++i) w[i] = __ldcs(reinterpret_cast<const uint4*>(pl[i] + off));
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
    const bool live = ls < nsl4, valid = live && sA + ls < sB;
    const int e0 = (sA + ls) * 128 + 32 * (st >> 2) + 2 * (st & 3);
    float v[8];  // v[2 k + h] = x[e0 + 8 k + h]
    load_unit8(p, xr, e0, valid, v);
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
}

__device__ __forceinline__ void put_out(const Params& p, int row, int r, float v) {
  const long long orow = p.oidx ? static_cast<long long>(p.oidx[r]) : static_cast<long long>(r);
  if (p.ow) v *= p.ow[r];
  float* dst = p.out + orow * p.ldo + row;
  if (p.atomic) atomicAdd(dst, v);
  else *dst = v;
}

// Block: row tiles [rtg * rb_n, +rb_n) of 8 rows x kw k-parts (warp = rb * kw + k part), spans of
// k part ks, token-list row r of job `job`.
template <int SCHEME, int BITS>
__device__ void gemv_body(const Params& p, const Jobs& jobs, int job, int r, int rtg, int ks) {
#if __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int NARR = SCHEME == kMsb ? 2 : BITS;  // scale, minimum (, alpha of planes 2..): chunk a
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int kwn = p.kw, rbn = kGemvWarps / kwn, rb = warp / kwn, kw = warp - rb * kwn;
  const int gs = 1 << p.gshift;  // spans per group
  const int sA = ks * p.spb, sB = min(p.nsp, sA + p.spb), nsl4 = (sB - sA + 3) & ~3, ncb = nsl4 >> 2;
  const int gA = sA >> p.gshift, ngb = ((sB + gs - 1) >> p.gshift) - gA;
  const int mrows = rbn * 8, brow0 = rtg * mrows, trow = brow0 + rb * 8;
  uint32_t* xa = reinterpret_cast<uint32_t*>(smem);
  float2* xst = reinterpret_cast<float2*>(smem + p.xa_bytes);
  uint32_t* meta = reinterpret_cast<uint32_t*>(smem + p.xa_bytes + p.xst_bytes);
  float* red = reinterpret_cast<float*>(smem + p.xa_bytes + p.xst_bytes + p.meta_bytes);

  // metadata of the block's rows and groups -> shared memory (4-byte words covering each row's range)
#pragma unroll 1
  for (int a = 0; a < NARR; ++a) {
    const uint8_t* src = chunk_ptr(p, jobs, job, a) + p.meta_off;
    for (int rr = warp; rr < mrows; rr += kGemvWarps) {
      const long long h0 = static_cast<long long>(min(brow0 + rr, p.O - 1)) * p.ng + gA;
      const int nw = static_cast<int>(((h0 + ngb - 1) >> 1) - (h0 >> 1)) + 1;
      for (int j = lane; j < nw; j += 32) cp_async4(meta + (a * mrows + rr) * p.mw + j, src + 4 * ((h0 >> 1) + j));
    }
  }
  cp_async_commit();

  // the warp's first chunk of plane words in flight while x is prepared
  const int cA = kw * ncb / kwn, cB = (kw + 1) * ncb / kwn;
  const bool tile_on = trow < p.O;
  const long long roff = static_cast<long long>(min(trow + gid, p.O - 1)) * p.row_bytes;
  const uint8_t* pl[BITS];  // the lane's plane rows
#pragma unroll
  for (int i = 0; i < BITS; ++i) pl[i] = chunk_ptr(p, jobs, job, i) + p.plane_off + roff;
  auto span_off = [&](int c) { return 16LL * min(sA + 4 * c + tig, sB - 1); };
  uint4 wa[BITS], wb[BITS];
  if (tile_on && cA < cB) gemv_load<BITS>(wa, pl, span_off(cA));
  gemv_prep_x(p, xa, xst, r, sA, sB, nsl4);
  cp_async_wait<0>();
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
    // the next chunk's plane words are loaded while this one is decoded; mwq above 4 bits keeps one
    // buffer (its per-term accumulators need the registers), relying on the other warps instead
    constexpr bool kTwo = SCHEME == kMsb || BITS <= 4;
    for (int c = cA; c < cB; c += kTwo ? 2 : 1) {
      if (kTwo && c + 1 < cB) gemv_load<BITS>(wb, pl, span_off(c + 1));
      {
        const int gl = min((4 * c + s) >> p.gshift, ngb - 1);  // padding spans: any finite coefficient
        gemv_chunk<SCHEME, BITS>(y, yo, wa, xrec0 + c * xstep, xst[4 * c + s], ma + gl, mb + gl, astr);
      }
      const int cn = kTwo ? c + 2 : c + 1;
      if (cn < cB) gemv_load<BITS>(wa, pl, span_off(cn));
      if (kTwo && c + 1 < cB) {
        const int gl = min((4 * (c + 1) + s) >> p.gshift, ngb - 1);
        gemv_chunk<SCHEME, BITS>(y, yo, wb, xrec0 + (c + 1) * xstep, xst[4 * (c + 1) + s], ma + gl, mb + gl, astr);
      }
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

// grid: x = row-tile group * ksplit + k part, y = token of the job, z = job.
template <int SCHEME>
__global__ void __launch_bounds__(256, 2) gemv_kernel(const Params p, const Jobs jobs) {
  const int job = blockIdx.z, tok = blockIdx.y;
  if (tok >= jobs.count[job]) return;
  const int rtg = blockIdx.x / p.ksplit, ks = blockIdx.x - rtg * p.ksplit;
  const int r = jobs.row0[job] + tok;
  switch (jobs.bits[job]) {
    case 2: gemv_body<SCHEME, 2>(p, jobs, job, r, rtg, ks); break;
    case 3: gemv_body<SCHEME, 3>(p, jobs, job, r, rtg, ks); break;
    case 4: gemv_body<SCHEME, 4>(p, jobs, job, r, rtg, ks); break;
    case 5: gemv_body<SCHEME, 5>(p, jobs, job, r, rtg, ks); break;
    case 6: gemv_body<SCHEME, 6>(p, jobs, job, r, rtg, ks); break;
    case 7: gemv_body<SCHEME, 7>(p, jobs, job, r, rtg, ks); break;
    default: gemv_body<SCHEME, 8>(p, jobs, job, r, rtg, ks); break;
  }
}

template <int SCHEME>
cudaError_t configure_gemv() {
  static unsigned configured = 0;
  return raise_smem_limit(gemv_kernel<SCHEME>, configured);
}

template <int SCHEME>
cudaError_t launch_gemv(const Params& p, const Jobs& j, dim3 grid, size_t smem, cudaStream_t stream) {
  const cudaError_t e = configure_gemv<SCHEME>();
  if (e != cudaSuccess) return e;
  gemv_kernel<SCHEME><<<grid, dim3(32 * kGemvWarps), smem, stream>>>(p, j);
  return cudaGetLastError();
}

template <int SCHEME>
int occupancy_gemv(size_t smem) {
  int blocks = 0;
  if (configure_gemv<SCHEME>() != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gemv_kernel<SCHEME>, 32 * kGemvWarps, smem) != cudaSuccess)
    return 0;
  return blocks;
}

#endif  // __CUDACC__

}  // namespace edge_moe
