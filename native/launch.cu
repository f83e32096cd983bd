// Host side: choose the kernel (gemv_kernel for decode, nested_gemm_kernel otherwise) and its launch
// shape for a matrix, a job list and the GPU.
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <unordered_map>

#include "gemv.cuh"
#include "nested_gemm.cuh"

namespace edge_moe {

namespace {

struct DeviceInfo {
  int sms = 0, smem_optin = 0, major = 0, smem_sm = 0, smem_reserved = 0;
};

DeviceInfo device_info() {
  static DeviceInfo cache[64];
  int dev = 0;
  cudaGetDevice(&dev);
  DeviceInfo& d = cache[dev & 63];
  if (d.sms == 0) {
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev);
  }
  return d;
}

long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

long long round16(long long n) { return (n + 15) / 16 * 16; }

// Every plane row the launch reads starts on an `a`-byte boundary.
bool planes_aligned(const Params& p, const Jobs& jobs, int a) {
  if (reinterpret_cast<uintptr_t>(p.base) % a || p.plane_off % a || p.row_bytes % a) return false;
  for (int j = 0; j < jobs.n; ++j)
    for (int c = 0; c < jobs.bits[j]; ++c)
      if ((8ull * jobs.chunk[j][c]) % a) return false;
  return true;
}

// Row stride (words) of a warp's plane rows in shared memory: the 8 rows a warp reads at once, two
// adjacent words each, land in distinct banks; multiples of 4 (16-byte copies) preferred.
int pad_stride(int words) {
  for (int pad : {0, 4, 8, 2, 6, 10}) {
    const int sw = words + pad;
    if (sw % 2) continue;
    unsigned used = 0;
    bool ok = true;
    for (int g = 0; g < 8 && ok; ++g) {
      const unsigned bank = (sw * g) % 32;
      ok = !(used & (3u << bank));
      used |= 3u << bank;
    }
    if (ok || words <= 2) return sw;
  }
  return words + 2;
}

// Resident blocks per SM of a kernel instance at `smem` bytes, memoized: the runtime query costs
// microseconds and the planner asks for each candidate k range on every call.
int occupancy(int scheme, bool xlo, int nt, long long smem) {
  static std::mutex mu;
  static std::unordered_map<long long, int> cache;
  int dev = 0;
  cudaGetDevice(&dev);
  const long long key = ((((static_cast<long long>(dev) * 2 + scheme) * 2 + xlo) * 8 + nt) << 32) + smem;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  const int occ = scheme == kMsb ? occupancy_msb(xlo, nt, smem) : occupancy_mwq(xlo, nt, smem);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = occ;
  return occ;
}

int fail(char* err, int errlen, const char* msg) {
  snprintf(err, errlen, "%s", msg);
  return 1;
}

int zero_output(const Params& p, long long out_rows, cudaStream_t stream, char* err, int errlen) {
  const cudaError_t e = cudaMemsetAsync(p.out, 0, out_rows * p.ldo * sizeof(float), stream);
  return e == cudaSuccess ? 0 : fail(err, errlen, cudaGetErrorString(e));
}

// Resident gemv_kernel blocks per SM (bit class, warps per block, `smem` bytes), memoized like occupancy().
int gemv_occupancy(int scheme, int bclass, int nw, long long smem) {
  static std::mutex mu;
  static std::unordered_map<long long, int> cache;
  int dev = 0;
  cudaGetDevice(&dev);
  const long long key = ((((static_cast<long long>(dev) * 2 + scheme) * 16 + bclass) * 16 + nw) << 32) + smem;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  const int occ = scheme == kMsb ? occupancy_gemv_msb(bclass, 32 * nw, smem) : occupancy_gemv_mwq(bclass, 32 * nw, smem);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = occ;
  return occ;
}

// Shared memory of a gemv block whose k part is `spb` spans (x records, x scales, metadata, the
// k-part reduction, then each warp's weight ring); sets the plan fields it depends on.
long long gemv_smem(Params& p, long long spb, int narr, int mrows, int nw, int stages, int bits) {
  p.mw = static_cast<int>(spb / (p.G / 128) / 2 + 2);
  p.xa_bytes = static_cast<int>(round16((spb * kSpanWords + kZeroWords) * 4));
  p.xst_bytes = static_cast<int>(round16(spb * 8));
  p.meta_bytes = static_cast<int>(round16(4LL * narr * mrows * p.mw));
  p.ring_off = static_cast<int>(round16(p.xa_bytes + p.xst_bytes + p.meta_bytes + 4LL * kGemvWarps * 8));
  p.ring_bits = bits;
  p.stages = stages;
  return p.ring_off + static_cast<long long>(nw) * stages * bits * kPlaneStage;
}

GemvOptions g_gemv_options;  // set_gemv_options: forced plan parts and PDL, for benchmarks

// Shared memory per block (>= smem) at which at most `target` blocks of the gemv instance fit on an SM,
// or smem if no such size fits the device.
long long pad_to_occupancy(int scheme, int bclass, int nw, long long smem, int target, const DeviceInfo& dev) {
  long long s = std::max<long long>(smem, dev.smem_sm / (target + 1) - dev.smem_reserved + 128);
  s = (s + 127) / 128 * 128;
  while (s <= dev.smem_optin && gemv_occupancy(scheme, bclass, nw, s) > target) s += 1024;
  return s <= dev.smem_optin && gemv_occupancy(scheme, bclass, nw, s) == target ? s : smem;
}

// gemv_kernel: blocks of nw warps = (nw / kw) row tiles of 8 rows x kw k parts of the block's k range;
// a k split over blocks (ks, atomics into a zeroed output) divides the k range further; each warp
// streams its chunks through a ring of `stages` slots. Default: the plan with the least modelled
// time; the kernel is bound by each warp's chain of chunks (latency), so: waves of resident blocks x
// (chunks per warp + 2 for a block's start + a small term for the warps of the busiest SM, which
// breaks ties towards balanced SMs). With blocks_per_sm > 0: 8 warps,
// kw, then ks, grow until 8 * blocks_per_sm warps per SM have work (tests use it to force k splits).
// A programmatic dependent launch (sm_90) pads shared memory so that no more blocks fit on an SM than
// the grid places there: the next kernel's early blocks then cannot pile onto some SMs.
int plan_gemv(Params& p, const Jobs& jobs, int max_t, int max_bits, bool accumulate, long long out_rows,
              int blocks_per_sm, const DeviceInfo& dev, cudaStream_t stream, Plan* plan, char* err,
              int errlen) {
  const int gs = p.G / 128, nsp = p.ng * gs, nch = static_cast<int>(cdiv(nsp, 4));
  const long long rt = cdiv(p.O, 8), units = rt * jobs.n * max_t;
  int unit = 4;  // spans per k part: whole chunks and whole groups
  while (unit % gs) unit += 4;
  const int narr = p.scheme == kMsb ? 2 : max_bits, bclass = gemv_class(max_bits);
  const GemvOptions& o = g_gemv_options;
  // ring depth (chunks a warp has in flight + 1): up to 4 for 3-4 bits, 2 for 2 bits (measured best,
  // native/README.md), 3 for 5-6 and 2 for 7-8 bits; deeper only where it costs no modelled time
  const int st_max = o.stages ? o.stages : (max_bits == 2 ? 2 : (max_bits <= 4 ? 4 : (max_bits <= 6 ? 3 : 2)));
  const int st_min = o.stages ? o.stages : 2;
  int best_kw = 0, best_ks = 0, best_nw = 0, best_occ = 0, best_st = 0;
  long long best_per_sm = 0, best_blocks = 0;
  double best_cost = 0.0;
  for (int kw = 1; kw <= kGemvWarps; kw *= 2) {
    if (o.kw && kw != o.kw) continue;
    for (int nw = kGemvWarps / kw * kw; nw >= kw; nw -= kw) {
      if ((o.nw && nw != o.nw) || (blocks_per_sm > 0 && nw != kGemvWarps)) continue;
      for (int st = st_max; st >= st_min; --st)
      for (int ks = 1; ks == 1 || kw * ks <= nch; ks *= 2) {
        if (kw > 1 && kw * ks > nch) break;  // every warp keeps at least one chunk
        const long long spb = cdiv(cdiv(nsp, ks), unit) * unit, ks_eff = cdiv(nsp, spb);
        const long long smem = gemv_smem(p, spb, narr, nw / kw * 8, nw, st, max_bits);
        if (smem > dev.smem_optin) continue;
        const long long blocks = cdiv(rt, nw / kw) * jobs.n * max_t * ks_eff;
        const int occ = gemv_occupancy(p.scheme, bclass, nw, smem);
        if (occ < 1) continue;
        const long long per_sm = cdiv(blocks, dev.sms), waves = cdiv(per_sm, occ);
        double cost;
        if (blocks_per_sm > 0) {
          const long long target = 8LL * blocks_per_sm * dev.sms;
          cost = units * kw * ks_eff >= target ? kw * 64.0 + ks : 1e9 - kw * 64.0 - ks;  // least that reaches it
        } else {
          const double per_wave = static_cast<double>(std::min<long long>(per_sm, occ));
          const double cpw = static_cast<double>(cdiv(spb / 4, kw));
          cost = waves * (cpw + 2.0 + 0.02 * per_wave * nw) + (ks_eff > 1 ? 0.5 : 0.0) - 0.01 * st;
        }
        if (best_kw == 0 || cost < best_cost - 1e-9) {
          best_kw = kw, best_ks = ks, best_nw = nw, best_st = st, best_cost = cost;
          best_occ = occ, best_per_sm = per_sm, best_blocks = blocks;
        }
      }
    }
  }
  if (best_kw == 0) return fail(err, errlen, "gemv: x of one k part does not fit in shared memory");
  const int st = best_st;
  const long long spb = cdiv(cdiv(nsp, best_ks), unit) * unit;
  long long smem = gemv_smem(p, spb, narr, best_nw / best_kw * 8, best_nw, st, max_bits);
  p.kw = best_kw;
  p.nw = best_nw;
  p.gshift = 0;
  while ((1 << p.gshift) < gs) ++p.gshift;
  p.spb = static_cast<int>(spb);
  p.nsp = nsp;
  p.ksplit = static_cast<int>(cdiv(nsp, spb));
  p.atomic = accumulate || p.ksplit > 1;
  p.pdl = dev.major >= 9 && o.pdl ? 1 : 0;
  if (p.pdl && best_per_sm >= 2 && best_per_sm < best_occ && best_blocks <= best_occ * dev.sms)
    smem = pad_to_occupancy(p.scheme, bclass, best_nw, smem, static_cast<int>(best_per_sm), dev);
  if (p.ksplit > 1 && !accumulate && zero_output(p, out_rows, stream, err, errlen)) return 1;
  const dim3 grid(static_cast<unsigned>(cdiv(rt, best_nw / best_kw) * p.ksplit), max_t, jobs.n);
  if (plan)
    *plan = Plan{1, st, best_kw, p.ksplit, p.spb * 128, (int)grid.x, (int)grid.y, (int)grid.z, smem, best_nw};
  const dim3 block(32 * best_nw);
  const cudaError_t e = p.scheme == kMsb ? launch_gemv_msb(p, jobs, grid, block, smem, bclass, stream)
                                         : launch_gemv_mwq(p, jobs, grid, block, smem, bclass, stream);
  return e == cudaSuccess ? 0 : fail(err, errlen, cudaGetErrorString(e));
}

}  // namespace

void set_gemv_options(const GemvOptions& o) { g_gemv_options = o; }

int launch_nested_gemm(Params& p, const Jobs& jobs, bool accumulate, long long out_rows,
                       int blocks_per_sm, int kernel, cudaStream_t stream, Plan* plan, char* err,
                       int errlen) {
  if (jobs.n < 0 || jobs.n > kMaxJobs) return fail(err, errlen, "too many jobs for one launch");
  if (p.G <= 0 || p.G % 64) return fail(err, errlen, "group size must be a multiple of 64");
  int max_t = 0, max_bits = 0;
  for (int j = 0; j < jobs.n; ++j) {
    if (jobs.bits[j] < 2 || jobs.bits[j] > 8) return fail(err, errlen, "bits must be in 2..8");
    max_t = std::max(max_t, jobs.count[j]);
    max_bits = std::max(max_bits, jobs.bits[j]);
  }
  if (max_t == 0 || p.O == 0) return 0;
  const DeviceInfo dev = device_info();
  const int gs = p.G / 128;  // spans of 128 inputs per group: a power of two for gemv_kernel
  const bool gemv_ok = dev.major >= 8 && max_t <= kFastMaxT && p.G % 128 == 0 && (gs & (gs - 1)) == 0 &&
                       planes_aligned(p, jobs, 16);
  if (kernel == 2 && !gemv_ok)
    return fail(err, errlen, "gemv kernel needs sm_80+, <= 2 tokens per job, groups of 128 * 2^k and aligned planes");
  if (kernel != 1 && gemv_ok)
    return plan_gemv(p, jobs, max_t, max_bits, accumulate, out_rows, blocks_per_sm, dev, stream, plan, err, errlen);

  // Token tile: NT mma column tiles of 8 (hi + lo per token for float32 x, one per token otherwise).
  const bool xlo = p.xdtype == kF32;
  const int per_tile = xlo ? 4 : 8;
  const int nt = max_t <= per_tile ? 1 : (max_t <= 2 * per_tile ? 2 : 4);
  const int tpc = per_tile * nt;
  const int chunks = static_cast<int>(cdiv(max_t, tpc));
  const int warps = 4;
  const long long tiles = cdiv(p.O, 16LL * warps);
  const int bpg = p.G / 64;
  const int nsec = p.scheme == kMsb ? 2 : max_bits;
  const int ncol = xlo ? 2 * std::min(max_t, tpc) : std::min(max_t, tpc);  // used mma columns

  // k range per block (whole groups, 1024 inputs down to one group). With blocks_per_sm > 0: the
  // longest that gives that many blocks per SM. Otherwise the one with the least modelled time:
  // rounds of resident blocks (occupancy) times the inputs a block handles, plus a fixed cost.
  struct Cand { int g, sw, mw, words; long long smem, blocks; double cost; };
  Cand best{};
  for (int want = 1024, last = -1; want >= 64; want /= 2) {
    Cand c{};
    c.g = std::max(1, std::min(p.ng, want / p.G));
    if (c.g == last) continue;
    last = c.g;
    c.sw = pad_stride(2 * c.g * bpg);
    c.mw = c.g / 2 + 2;
    c.words = max_bits * 16 * c.sw + nsec * 16 * c.mw;
    c.smem = c.g * bpg * ncol * 128LL + (tpc * c.g * 8 + 15) / 16 * 16 + 4LL * warps * c.words;
    if (c.smem > dev.smem_optin) continue;
    c.blocks = tiles * cdiv(p.ng, c.g) * chunks * jobs.n;
    if (blocks_per_sm > 0) {
      c.cost = c.blocks >= static_cast<long long>(blocks_per_sm) * dev.sms ? -c.g : 1e9 + c.g;
    } else {
      const int occ = occupancy(p.scheme, xlo, nt, c.smem);
      const long long slots = std::max(1, occ) * static_cast<long long>(dev.sms);
      c.cost = static_cast<double>(cdiv(c.blocks, slots)) * (c.g * p.G + 256);
    }
    if (best.g == 0 || c.cost < best.cost) best = c;
  }
  if (best.g == 0) return fail(err, errlen, "tile does not fit in shared memory (group size too large?)");
  const int gps = best.g, kr = gps * p.G;
  const long long smem = best.smem, ksplit = cdiv(p.ng, gps);
  p.ksplit = static_cast<int>(ksplit);
  p.gps = gps;
  p.sw = best.sw;
  p.mw = best.mw;
  p.warp_words = best.words;
  p.xfrag_bytes = gps * bpg * ncol * 128;
  p.xstat_bytes = ((tpc * gps * 8) + 15) / 16 * 16;
  p.magic = kMagic;
  p.vec16 = planes_aligned(p, jobs, 16) && p.sw % 4 == 0 && (p.xfrag_bytes + p.xstat_bytes) % 16 == 0 &&
            p.warp_words % 4 == 0;
  p.atomic = accumulate || ksplit > 1;
  if (ksplit > 1 && !accumulate && zero_output(p, out_rows, stream, err, errlen)) return 1;
  const dim3 grid(static_cast<unsigned>(tiles * ksplit), chunks, jobs.n), block(32 * warps);
  if (plan) *plan = Plan{0, nt, 0, p.ksplit, kr, (int)grid.x, (int)grid.y, (int)grid.z, smem, warps};
  const cudaError_t e = p.scheme == kMsb ? launch_msb(xlo, nt, p, jobs, grid, block, smem, stream)
                                         : launch_mwq(xlo, nt, p, jobs, grid, block, smem, stream);
  if (e != cudaSuccess) return fail(err, errlen, cudaGetErrorString(e));
  return 0;
}

}  // namespace edge_moe
