// Bit-plane GEMM on nested (matryoshka) expert weights, on fp16 tensor cores (prefill: T > 2).
//
// Op: y[t, o] = sum_g ( sum_p coef[p,o,g] * dot(P_p[o,g,:], x_g) + offset[o,g] * sum(x_g) )
// (edge_moe/format/nested.py), for one matrix of one or many experts, each read from its 8 chunk
// addresses (a contiguous expert range, a slab row or scattered arena units alike). Decode shapes
// (T <= 2 tokens per expert) take the int8 kernel of gemv.cuh. native/README.md maps each kernel
// to its op and to the byte layout it reads.
//
// Design, per warp: 16 output rows x the block's k-range, in 64-input blocks (two 32-bit words per
// row and plane). Plane words are staged in shared memory (cp.async on sm_80+), then turned into
// fp16 A fragments of mma.m16n8k16 with a few bit operations per pair of weights: the bits of a
// weight's planes are moved into the low mantissa of an fp16 whose exponent field holds 1024
// (0x6400), so the fp16 value is exactly 1024 + code. The 1024 * sum(x) part is removed with the
// group's offset term. A pair (input e, input e+16) of a 32-bit plane word fills one half2 register
// with one rotate, so the k order inside an mma step is permuted; x is written into shared memory
// in the same permuted order (B fragments). x is split into fp16 hi + lo parts (two B columns per
// token) after a power-of-two scale per (token, group): float32 inputs keep about 22 bits.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace edge_moe {

constexpr int kMaxJobs = 64;    // active experts per launch (jobs pass by value in the 4 KB of kernel parameters)
constexpr int kMsb = 0, kMwq = 1;
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;
constexpr uint32_t kMagic = 0x64006400u;  // half2 (1024, 1024): mantissa bits 0..9 hold the code

// Job j: an expert at bits[j] on rows [row0, row0 + count) of the token list; its chunk c (plane c
// of every matrix, then the metadata of level c) starts at base + 8 * chunk[j][c] (unused: c >= bits).
struct Jobs {
  int n;
  int bits[kMaxJobs];
  int row0[kMaxJobs];
  int count[kMaxJobs];
  uint32_t chunk[kMaxJobs][8];
};

struct Params {
  const uint8_t* base;       // chunk addresses are 8-byte units from here
  long long plane_off;       // the matrix's plane p: in chunk p at this offset
  long long meta_off;        // its scale (chunk 0), minimum (chunk 1), alpha of plane p >= 2 (chunk p)
  int scheme;                // kMsb | kMwq
  int O, N, G, ng, row_bytes;                  // rows, inputs, group size, groups, bytes per plane row
  const void* x;             // [*, ldx] float32 / float16 / bfloat16
  long long ldx;
  const int* xidx;           // row of x for token-list row r (null: r)
  int xdtype, swiglu;        // swiglu: input = silu(x[:, :N]) * x[:, N:2N]
  float* out;                // [*, ldo] float32
  long long ldo;
  const int* oidx;           // output row for token-list row r (null: r)
  const float* ow;           // scale of row r (null: 1)
  int atomic;                // atomicAdd instead of store (k split over blocks, or accumulate)
  // plan (launch.cu)
  int ksplit, gps;           // k parts, groups per part
  int sw, mw;                // shared row strides (words) of a warp's plane rows and metadata rows
  int warp_words;            // shared words per warp (weights + metadata at the launch's most bits)
  int xfrag_bytes, xstat_bytes;
  int vec16;                 // plane rows and chunks 16-byte aligned: copy 16 bytes at a time
  uint32_t magic;            // kMagic, passed at run time so that it stays in a register (one LOP3)
  // plan of the decode kernel (gemv.cuh): k warps per row tile, spans (128 inputs) per k part
  int kw, spb, nsp, gshift, xa_bytes, xst_bytes, meta_bytes;  // gshift: log2(G / 128)
  int nw, stages, ring_off, ring_bits;  // warps per block, weight ring depth, its offset, planes per stage
  int pdl;                              // launched as a programmatic dependent: prefetch into L2 first
};

struct Plan {  // what launch_nested_gemm chose (reported to Python for benchmarks)
  int kernel;    // 0: nested_gemm_kernel (fp16 mma), 1: gemv_kernel (int8 mma)
  int nt, kw, ksplit, kr, grid_x, grid_y, grid_z;  // nt: token tiles (gemv_kernel: weight ring stages)
  long long smem;
  int warps;     // per block
};

// Parts of the decode kernel's plan forced (0: the planner's choice) and whether it may launch as a
// programmatic dependent of the previous kernel (sm_90); for benchmarks and tests.
struct GemvOptions {
  int pdl = 1;
  int kw = 0, nw = 0, stages = 0;
};
void set_gemv_options(const GemvOptions& o);

// Picks the kernel (kernel: 0 auto, 1 nested_gemm_kernel, 2 gemv_kernel where it applies), plans
// (token tile, k split, shared memory) and launches on `stream`. Returns 0, or 1 with a message in
// err. Zeroes out[0:out_rows] first when the k split needs atomics and !accumulate.
int launch_nested_gemm(Params& p, const Jobs& jobs, bool accumulate, long long out_rows,
                       int blocks_per_sm, int kernel, cudaStream_t stream, Plan* plan, char* err,
                       int errlen);

int occupancy_msb(bool xlo, int nt, size_t smem);  // resident blocks of 128 threads per SM
int occupancy_mwq(bool xlo, int nt, size_t smem);

cudaError_t launch_msb(bool xlo, int nt, const Params& p, const Jobs& j, dim3 grid, dim3 block,
                       size_t smem, cudaStream_t stream);
cudaError_t launch_mwq(bool xlo, int nt, const Params& p, const Jobs& j, dim3 grid, dim3 block,
                       size_t smem, cudaStream_t stream);

#ifdef __CUDACC__

// ---------------------------------------------------------------- small device helpers

__device__ __forceinline__ const uint8_t* chunk_ptr(const Params& p, const Jobs& jobs, int job, int c) {
  return p.base + 8ull * jobs.chunk[job][c];
}

__device__ __forceinline__ uint32_t rotr(uint32_t x, int n) { return __funnelshift_r(x, x, n); }

__host__ __device__ constexpr uint32_t rotl_c(uint32_t x, int n) {
  return n == 0 ? x : (x << n) | (x >> (32 - n));
}

template <int NP>
__host__ __device__ constexpr uint32_t plane_mask() {  // mantissa bits 9, 8, ... of both halves
  uint32_t m = 0;
  for (int i = 0; i < NP; ++i) m |= 0x00010001u << (9 - i);
  return m;
}

__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
#else
  *reinterpret_cast<uint2*>(smem) = __ldg(reinterpret_cast<const uint2*>(gmem));
#endif
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = __ldg(reinterpret_cast<const uint4*>(gmem));
#endif
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
#else
  *reinterpret_cast<uint32_t*>(smem) = __ldg(reinterpret_cast<const uint32_t*>(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// c += A (16x16 fp16, rows g / g+8) * B (16x8 fp16), fp32 accumulate. sm_75 has only k8.
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a2), "r"(a3), "r"(b1));
#endif
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------- weights -> A fragments

// Pair J of a thread: inputs (s + J, s + J + 16) of its word, s = 8 * (tig & 1). w[i] holds plane
// P0 + i rotated so that input s + J sits at bit J + 9 - i. Planes are merged with bit selects,
// one rotate brings the pair to bits (9 - i) and (25 - i), one AND/OR adds the exponent.
template <int NP, int J>
__device__ __forceinline__ uint32_t pair_bits(const uint32_t (&w)[NP], uint32_t magic) {
  uint32_t c = w[0];
#pragma unroll
  for (int i = 1; i < NP; ++i) {
    const uint32_t m = rotl_c(0x00010001u, (J + 9 - i) & 31);
    c = (c & ~m) | (w[i] & m);
  }
  const uint32_t r = J ? rotr(c, J) : c;
  return (r & plane_mask<NP>()) | magic;  // magic = kMagic in a register: one LOP3
}

// xf: B fragments of one 64-input block, [t][col][tig] for the block's ncol used columns; lanes of
// unused columns (tokens past the end) feed zeros.
template <int NP, int NT, int T>
__device__ __forceinline__ void kstep(float (&acc)[NT][4], const uint32_t (&wa)[NP],
                                      const uint32_t (&wb)[NP], const uint2* xf, int ncol, int lane,
                                      uint32_t magic) {
  const uint32_t a0 = pair_bits<NP, 2 * T>(wa, magic), a1 = pair_bits<NP, 2 * T>(wb, magic);
  const uint32_t a2 = pair_bits<NP, 2 * T + 1>(wa, magic), a3 = pair_bits<NP, 2 * T + 1>(wb, magic);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + (lane >> 2);
    const uint2 b = col < ncol ? xf[(T * ncol + col) * 4 + (lane & 3)] : make_uint2(0u, 0u);
    mma16816(acc[nt], a0, a1, a2, a3, b.x, b.y);
  }
}

// One 64-input block of one term (planes P0..P0+NP-1 at mantissa bits 9..10-NP) for rows g, g+8.
template <int NP, int NT>
__device__ __forceinline__ void term_block(float (&acc)[NT][4], const uint32_t* plane0, int pstride,
                                           int sw, int word, int gid, int sbase, const uint2* xf,
                                           int ncol, int lane, uint32_t magic) {
  uint32_t wa[NP], wb[NP];
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    const uint32_t* pl = plane0 + i * pstride + word;
    const int sh = (sbase - (9 - i)) & 31;
    wa[i] = rotr(pl[gid * sw], sh);
    wb[i] = rotr(pl[(gid + 8) * sw], sh);
  }
  kstep<NP, NT, 0>(acc, wa, wb, xf, ncol, lane, magic);
  kstep<NP, NT, 1>(acc, wa, wb, xf, ncol, lane, magic);
  kstep<NP, NT, 2>(acc, wa, wb, xf, ncol, lane, magic);
  kstep<NP, NT, 3>(acc, wa, wb, xf, ncol, lane, magic);
}

// ---------------------------------------------------------------- x -> B fragments

__device__ __forceinline__ float load_raw(const Params& p, long long row, int e) {
  const long long i = row * p.ldx + e;
  if (p.xdtype == kF32) return static_cast<const float*>(p.x)[i];
  if (p.xdtype == kF16) return __half2float(static_cast<const __half*>(p.x)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p.x)[i]);
}

__device__ __forceinline__ float load_x(const Params& p, long long row, int e) {
  if (e >= p.N) return 0.f;  // inputs are padded to whole groups with zeros
  if (!p.swiglu) return load_raw(p, row, e);
  const float g = load_raw(p, row, e), u = load_raw(p, row, p.N + e);
  return g / (1.f + expf(-g)) * u;  // silu(gate) * up
}

__device__ __forceinline__ long long x_row(const Params& p, int r) {
  return p.xidx ? static_cast<long long>(p.xidx[r]) : static_cast<long long>(r);
}

__device__ __forceinline__ uint32_t split_pair(float v0, float v1, int lo) {
  __half h0 = __float2half_rn(v0), h1 = __float2half_rn(v1);
  if (lo) {
    h0 = __float2half_rn(v0 - __half2float(h0));
    h1 = __float2half_rn(v1 - __half2float(h1));
  }
  return static_cast<uint32_t>(__half_as_ushort(h0)) | (static_cast<uint32_t>(__half_as_ushort(h1)) << 16);
}

// The 16 inputs of a unit, (e0 .. e0+7, e0+16 .. e0+23), times inv.
__device__ __forceinline__ void load_unit(const Params& p, long long row, int e0, float inv, float (&v)[16]) {
  if (!p.swiglu && e0 + 24 <= p.N) {  // the common case: no bounds, one dtype branch
    const long long i = row * p.ldx + e0;
    if (p.xdtype == kF32) {
      const float* x = static_cast<const float*>(p.x) + i;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = x[k] * inv, v[8 + k] = x[16 + k] * inv;
    } else if (p.xdtype == kF16) {
      const __half* x = static_cast<const __half*>(p.x) + i;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = __half2float(x[k]) * inv, v[8 + k] = __half2float(x[16 + k]) * inv;
    } else {
      const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + i;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        v[k] = __bfloat162float(x[k]) * inv, v[8 + k] = __bfloat162float(x[16 + k]) * inv;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = load_x(p, row, e0 + k) * inv, v[8 + k] = load_x(p, row, e0 + 16 + k) * inv;
}

__device__ __forceinline__ void xscale(float amax, float& xs, float& inv) {
  xs = inv = 1.f;
  if (amax > 0.f) {
    int ex;
    frexpf(amax, &ex);
    ex = max(ex, -100);
    xs = ldexpf(1.f, ex - 14);
    inv = ldexpf(1.f, 14 - ex);
  }
}

// xstat[tl * ngr + gl] = (xs, sum x) per (token, group): x is fed to the mma as x / xs in fp16,
// xs a power of two putting max |x_g| in [2^13, 2^14). xfrag holds the B fragments of the used
// columns, [kb][t][col][tig] in the permuted k order. A unit is 16 inputs of one token, (e0 .. e0+7,
// e0+16 .. e0+23), e0 = 64 kb + 32 w + 8 h: the four k steps of mma lane tig = 2 w + h.
template <bool XLO>
__device__ void prep_x(const Params& p, float2* xstat, uint2* xfrag, int r0, int ntok, int gA, int ngr) {
  const int bpg = p.G >> 6, nkb = ngr * bpg, nunits = ntok * nkb * 4, ncol = XLO ? 2 * ntok : ntok;
  for (int i = threadIdx.x; i < ntok * ngr; i += blockDim.x) xstat[i] = make_float2(0.f, 0.f);
  __syncthreads();
  for (int q = threadIdx.x; q < nunits; q += blockDim.x) {  // pass 1: max |x| per (token, group)
    const int kb = (q >> 2) % nkb, tl = (q >> 2) / nkb;
    float v[16];
    load_unit(p, x_row(p, r0 + tl), (gA * bpg + kb) * 64 + 32 * ((q >> 1) & 1) + 8 * (q & 1), 1.f, v);
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(v[i]));
    atomicMax(reinterpret_cast<int*>(&xstat[tl * ngr + kb / bpg].x), __float_as_int(m));
  }
  __syncthreads();
  for (int q = threadIdx.x; q < nunits; q += blockDim.x) {  // pass 2: fragments and sums
    const int kb = (q >> 2) % nkb, tl = (q >> 2) / nkb, tig = q & 3;
    float xs, inv, v[16];
    xscale(xstat[tl * ngr + kb / bpg].x, xs, inv);
    load_unit(p, x_row(p, r0 + tl), (gA * bpg + kb) * 64 + 32 * ((q >> 1) & 1) + 8 * (q & 1), inv, v);
    float sum = 0.f;
#pragma unroll
    for (int lo = 0; lo < (XLO ? 2 : 1); ++lo) {
      const int col = XLO ? 2 * tl + lo : tl;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const uint32_t b0 = split_pair(v[2 * t], v[8 + 2 * t], lo);
        const uint32_t b1 = split_pair(v[2 * t + 1], v[9 + 2 * t], lo);
        xfrag[((kb * 4 + t) * ncol + col) * 4 + tig] = make_uint2(b0, b1);
        const __half2 h0 = *reinterpret_cast<const __half2*>(&b0), h1 = *reinterpret_cast<const __half2*>(&b1);
        sum += __low2float(h0) + __high2float(h0) + __low2float(h1) + __high2float(h1);
      }
    }
    atomicAdd(&xstat[tl * ngr + kb / bpg].y, sum);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ntok * ngr; i += blockDim.x) {
    float xs, inv;
    xscale(xstat[i].x, xs, inv);
    xstat[i] = make_float2(xs, xstat[i].y * xs);
  }
  __syncthreads();
}

// ---------------------------------------------------------------- per-group epilogue

// y += c_row * xs_tok * M (M = mma sum over the term's planes) for the thread's rows and tokens.
template <bool XLO, int NT>
__device__ __forceinline__ void apply_term(float (&y)[NT][4], const float (&acc)[NT][4], float ca,
                                           float cb, const float2* st, int ngr, int tig) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (XLO) {  // columns 2 tig, 2 tig + 1: hi and lo part of token nt * 4 + tig
      const float xs = st[(nt * 4 + tig) * ngr].x;
      y[nt][0] += ca * xs * (acc[nt][0] + acc[nt][1]);
      y[nt][2] += cb * xs * (acc[nt][2] + acc[nt][3]);
    } else {  // columns 2 tig, 2 tig + 1: tokens nt * 8 + 2 tig (+1)
      const float x0 = st[(nt * 8 + 2 * tig) * ngr].x, x1 = st[(nt * 8 + 2 * tig + 1) * ngr].x;
      y[nt][0] += ca * x0 * acc[nt][0];
      y[nt][1] += ca * x1 * acc[nt][1];
      y[nt][2] += cb * x0 * acc[nt][2];
      y[nt][3] += cb * x1 * acc[nt][3];
    }
  }
}

template <bool XLO, int NT>
__device__ __forceinline__ void apply_offset(float (&y)[NT][4], float da, float db, const float2* st,
                                             int ngr, int tig) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (XLO) {
      const float sx = st[(nt * 4 + tig) * ngr].y;
      y[nt][0] += da * sx;
      y[nt][2] += db * sx;
    } else {
      const float s0 = st[(nt * 8 + 2 * tig) * ngr].y, s1 = st[(nt * 8 + 2 * tig + 1) * ngr].y;
      y[nt][0] += da * s0;
      y[nt][1] += da * s1;
      y[nt][2] += db * s0;
      y[nt][3] += db * s1;
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&a)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) a[nt][0] = a[nt][1] = a[nt][2] = a[nt][3] = 0.f;
}

// One group g of the warp's 16 rows: all terms of the scheme, then the offset term. ma / mb: the
// metadata of rows g / g+8 in shared memory, indexed by group; sections msec halves apart
// (scale, minimum, alpha of planes 2..).
template <int SCHEME, bool XLO, int NT, int BITS>
__device__ __forceinline__ void group_compute(float (&y)[NT][4], const Params& p, const uint32_t* buf,
                                              const uint2* xfrag, const float2* st, int g, int kb0, int ngr,
                                              const __half* ma, const __half* mb, int msec, int ncol,
                                              int lane) {
  const uint32_t magic = p.magic;
  const int gid = lane >> 2, tig = lane & 3, sbase = (tig & 1) * 8, wsel = tig >> 1;
  const int bpg = p.G >> 6, pstride = 16 * p.sw;
  const float sa = __half2float(ma[g]), sb = __half2float(mb[g]);
  const float na = __half2float(ma[msec + g]), nb = __half2float(mb[msec + g]);
  float acc[NT][4];
  if (SCHEME == kMsb) {  // one term: w = scale * q8 + offset, fp16 value 1024 + 4 q8
    zero(acc);
    for (int bi = 0; bi < bpg; ++bi)
      term_block<BITS, NT>(acc, buf, pstride, p.sw, 2 * (kb0 + bi) + wsel, gid, sbase,
                           xfrag + (kb0 + bi) * 16 * ncol, ncol, lane, magic);
    apply_term<XLO, NT>(y, acc, 0.25f * sa, 0.25f * sb, st, ngr, tig);
    const float centre = ((1 << (8 - BITS)) - 1) * 0.5f - 256.f;  // bucket centre, minus 1024 / 4
    apply_offset<XLO, NT>(y, na + sa * centre, nb + sb * centre, st, ngr, tig);
  } else {  // base code 2 b0 + b1 (value 1024 + 256 code), then sign planes (1024 + 512 bit)
    float suma = 0.f, sumb = 0.f;
    zero(acc);
    for (int bi = 0; bi < bpg; ++bi)
      term_block<2, NT>(acc, buf, pstride, p.sw, 2 * (kb0 + bi) + wsel, gid, sbase,
                        xfrag + (kb0 + bi) * 16 * ncol, ncol, lane, magic);
    apply_term<XLO, NT>(y, acc, sa * (1.f / 256.f), sb * (1.f / 256.f), st, ngr, tig);
#pragma unroll
    for (int k = 0; k < BITS - 2; ++k) {
      const float aa = __half2float(ma[(2 + k) * msec + g]), ab = __half2float(mb[(2 + k) * msec + g]);
      suma += aa;
      sumb += ab;
      zero(acc);
      for (int bi = 0; bi < bpg; ++bi)
        term_block<1, NT>(acc, buf + (2 + k) * pstride, pstride, p.sw, 2 * (kb0 + bi) + wsel, gid,
                          sbase, xfrag + (kb0 + bi) * 16 * ncol, ncol, lane, magic);
      apply_term<XLO, NT>(y, acc, aa * (1.f / 256.f), ab * (1.f / 256.f), st, ngr, tig);
    }
    apply_offset<XLO, NT>(y, na - 4.f * sa - 5.f * suma, nb - 4.f * sb - 5.f * sumb, st, ngr, tig);
  }
}

template <bool XLO, int NT>
__device__ __forceinline__ void store_rows(const Params& p, const float (&y)[NT][4], int row_a,
                                           int r0, int ntok, int tig) {
  auto put = [&](int row, int tl, float v) {
    if (row >= p.O || tl >= ntok) return;
    const int r = r0 + tl;
    const long long orow = p.oidx ? static_cast<long long>(p.oidx[r]) : static_cast<long long>(r);
    if (p.ow) v *= p.ow[r];
    float* dst = p.out + orow * p.ldo + row;
    if (p.atomic) atomicAdd(dst, v);
    else *dst = v;
  };
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (XLO) {
      put(row_a, nt * 4 + tig, y[nt][0]);
      put(row_a + 8, nt * 4 + tig, y[nt][2]);
    } else {
      put(row_a, nt * 8 + 2 * tig, y[nt][0]);
      put(row_a, nt * 8 + 2 * tig + 1, y[nt][1]);
      put(row_a + 8, nt * 8 + 2 * tig, y[nt][2]);
      put(row_a + 8, nt * 8 + 2 * tig + 1, y[nt][3]);
    }
  }
}

// ---------------------------------------------------------------- the block

// Block: nwarps x 16 rows, groups [gA, gB), tokens [r0, r0 + ntok) of the job's token list. Each
// warp copies all its plane rows and metadata for the k range in one cp.async batch (64-128
// contiguous bytes per plane row), the block prepares x meanwhile, then the warp computes.
template <int SCHEME, bool XLO, int NT, int BITS>
__device__ void block_body(const Params& p, const Jobs& jobs, int job, int r0, int ntok, int tile, int gA,
                           int gB) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint2* xfrag = reinterpret_cast<uint2*>(smem);
  float2* xstat = reinterpret_cast<float2*>(smem + p.xfrag_bytes);
  uint32_t* wsm = reinterpret_cast<uint32_t*>(smem + p.xfrag_bytes + p.xstat_bytes);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int row0 = (tile * nwarps + warp) * 16;
  const bool active = row0 < p.O;
  const int ngr = gB - gA, bpg = p.G >> 6, nblk = ngr * bpg;
  constexpr int NSEC = SCHEME == kMsb ? 2 : BITS;  // scale, minimum (, alpha of planes 2..BITS-1)
  uint32_t* wbuf = wsm + warp * p.warp_words;      // [BITS][16 rows][sw]
  uint32_t* mbuf = wbuf + BITS * 16 * p.sw;        // [NSEC][16 rows][mw]

  if (active) {
    // 16 bytes (two 64-input blocks) per copy where aligned, else 8; lanes walk (plane, row, chunk)
    // with the chunk fastest, so that a plane row's bytes are requested together.
    const bool c16 = p.vec16 && !((gA * bpg) & 1) && !(nblk & 1);
    const int cw = c16 ? 2 : 1, nch = nblk / cw, total = BITS * 16 * nch;
    const int adv_rest = 32 / nch, adv_b = 32 % nch;
    int b = lane % nch, rest = lane / nch;
    for (int c = lane; c < total; c += 32) {
      const int row = rest & 15, pl = rest >> 4;
      const long long grow = min(row0 + row, p.O - 1);
      uint32_t* dst = wbuf + (pl * 16 + row) * p.sw + 2 * cw * b;
      const uint8_t* src = chunk_ptr(p, jobs, job, pl) + p.plane_off + grow * p.row_bytes + (gA * bpg + cw * b) * 8;
      if (c16) cp_async16(dst, src);
      else cp_async8(dst, src);
      b += adv_b;
      rest += adv_rest;
      if (b >= nch) b -= nch, ++rest;
    }
    for (int c = lane; c < NSEC * 16 * p.mw; c += 32) {  // 4-byte words covering groups gA..gB-1
      const int j = c % p.mw, rest2 = c / p.mw, row = rest2 & 15, sec = rest2 >> 4;
      const long long h0 = static_cast<long long>(min(row0 + row, p.O - 1)) * p.ng + gA;
      const long long w0 = h0 >> 1, w1 = (h0 + ngr - 1) >> 1;
      // metadata section sec (scale, minimum, alpha of plane sec) lives in chunk sec
      if (w0 + j <= w1) cp_async4(mbuf + (sec * 16 + row) * p.mw + j, chunk_ptr(p, jobs, job, sec) + p.meta_off + 4 * (w0 + j));
    }
    cp_async_commit();
  }
  prep_x<XLO>(p, xstat, xfrag, r0, ntok, gA, ngr);  // overlaps the weight loads
  if (!active) return;
  cp_async_wait<0>();
  __syncwarp();

  const int gid = lane >> 2, tig = lane & 3;
  const int pa = static_cast<int>((static_cast<long long>(min(row0 + gid, p.O - 1)) * p.ng + gA) & 1);
  const int pb = static_cast<int>((static_cast<long long>(min(row0 + gid + 8, p.O - 1)) * p.ng + gA) & 1);
  const __half* mh = reinterpret_cast<const __half*>(mbuf);
  const __half* ma = mh + gid * 2 * p.mw + pa - gA;  // ma[g]: scale of row gid, group g
  const __half* mb = mh + (gid + 8) * 2 * p.mw + pb - gA;
  const int msec = 16 * 2 * p.mw;
  float y[NT][4];
  zero(y);
  for (int g = gA; g < gB; ++g)
    group_compute<SCHEME, XLO, NT, BITS>(y, p, wbuf, xfrag, xstat + (g - gA), g, (g - gA) * bpg, ngr,
                                         ma, mb, msec, XLO ? 2 * ntok : ntok, lane);
  store_rows<XLO, NT>(p, y, row0 + gid, r0, ntok, tig);
}

// grid: x = row tile * ksplit + k part, y = token chunk, z = job.
template <int SCHEME, bool XLO, int NT>
__global__ void __launch_bounds__(256, 1) nested_gemm_kernel(const Params p, const Jobs jobs) {
  constexpr int TPC = XLO ? 4 * NT : 8 * NT;
  const int job = blockIdx.z;
  const int count = jobs.count[job], tok0 = blockIdx.y * TPC;
  if (tok0 >= count) return;
  const int tile = blockIdx.x / p.ksplit, ks = blockIdx.x - tile * p.ksplit;
  const int gA = ks * p.gps;
  if (gA >= p.ng) return;
  const int gB = min(p.ng, gA + p.gps);
  const int r0 = jobs.row0[job] + tok0, ntok = min(TPC, count - tok0);
  switch (jobs.bits[job]) {
    case 2: block_body<SCHEME, XLO, NT, 2>(p, jobs, job, r0, ntok, tile, gA, gB); break;
    case 3: block_body<SCHEME, XLO, NT, 3>(p, jobs, job, r0, ntok, tile, gA, gB); break;
    case 4: block_body<SCHEME, XLO, NT, 4>(p, jobs, job, r0, ntok, tile, gA, gB); break;
    case 5: block_body<SCHEME, XLO, NT, 5>(p, jobs, job, r0, ntok, tile, gA, gB); break;
    case 6: block_body<SCHEME, XLO, NT, 6>(p, jobs, job, r0, ntok, tile, gA, gB); break;
    case 7: block_body<SCHEME, XLO, NT, 7>(p, jobs, job, r0, ntok, tile, gA, gB); break;
    default: block_body<SCHEME, XLO, NT, 8>(p, jobs, job, r0, ntok, tile, gA, gB); break;
  }
}

// Raise a kernel's dynamic shared-memory limit to the device's opt-in maximum, once per device
// (`configured`: a bit per device; before any graph capture: benchmarks and the runtime warm up first).
template <typename Kernel>
cudaError_t raise_smem_limit(Kernel kernel, unsigned& configured) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 32 || (configured & (1u << dev))) return cudaSuccess;
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (e == cudaSuccess) configured |= 1u << dev;
  return e;
}

template <int SCHEME, bool XLO, int NT>
cudaError_t configure() {
  static unsigned configured = 0;
  return raise_smem_limit(nested_gemm_kernel<SCHEME, XLO, NT>, configured);
}

template <int SCHEME, bool XLO, int NT>
cudaError_t launch_one(const Params& p, const Jobs& j, dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream) {
  const cudaError_t e = configure<SCHEME, XLO, NT>();
  if (e != cudaSuccess) return e;
  nested_gemm_kernel<SCHEME, XLO, NT><<<grid, block, smem, stream>>>(p, j);
  return cudaGetLastError();
}

template <int SCHEME, bool XLO, int NT>
int occupancy_one(size_t smem) {
  int blocks = 0;
  if (configure<SCHEME, XLO, NT>() != cudaSuccess) return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nested_gemm_kernel<SCHEME, XLO, NT>, 128, smem) !=
      cudaSuccess)
    return 0;
  return blocks;
}

template <int SCHEME>
int occupancy_scheme(bool xlo, int nt, size_t smem) {
  if (xlo) return nt == 1 ? occupancy_one<SCHEME, true, 1>(smem)
                          : (nt == 2 ? occupancy_one<SCHEME, true, 2>(smem) : occupancy_one<SCHEME, true, 4>(smem));
  return nt == 1 ? occupancy_one<SCHEME, false, 1>(smem)
                 : (nt == 2 ? occupancy_one<SCHEME, false, 2>(smem) : occupancy_one<SCHEME, false, 4>(smem));
}

template <int SCHEME>
cudaError_t launch_scheme(bool xlo, int nt, const Params& p, const Jobs& j, dim3 grid, dim3 block,
                          size_t smem, cudaStream_t stream) {
  if (xlo) {
    if (nt == 1) return launch_one<SCHEME, true, 1>(p, j, grid, block, smem, stream);
    if (nt == 2) return launch_one<SCHEME, true, 2>(p, j, grid, block, smem, stream);
    return launch_one<SCHEME, true, 4>(p, j, grid, block, smem, stream);
  }
  if (nt == 1) return launch_one<SCHEME, false, 1>(p, j, grid, block, smem, stream);
  if (nt == 2) return launch_one<SCHEME, false, 2>(p, j, grid, block, smem, stream);
  return launch_one<SCHEME, false, 4>(p, j, grid, block, smem, stream);
}

#endif  // __CUDACC__

}  // namespace edge_moe
