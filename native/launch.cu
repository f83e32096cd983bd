// Host side: choose the launch shape of nested_gemm_kernel for a matrix, a job list and the GPU.
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <unordered_map>

#include "nested_gemm.cuh"

namespace edge_moe {

namespace {

struct DeviceInfo {
  int sms = 0, smem_optin = 0;
};

DeviceInfo device_info() {
  static DeviceInfo cache[64];
  int dev = 0;
  cudaGetDevice(&dev);
  DeviceInfo& d = cache[dev & 63];
  if (d.sms == 0) {
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  return d;
}

long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

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

}  // namespace

int launch_nested_gemm(Params& p, const Jobs& jobs, bool accumulate, long long out_rows,
                       int blocks_per_sm, cudaStream_t stream, Plan* plan, char* err, int errlen) {
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
  bool v16 = p.row_bytes % 16 == 0 && p.slab_stride % 16 == 0 && reinterpret_cast<uintptr_t>(p.slab) % 16 == 0 &&
             p.sw % 4 == 0 && (p.xfrag_bytes + p.xstat_bytes) % 16 == 0 && p.warp_words % 4 == 0;
  for (int i = 0; i < max_bits; ++i) v16 = v16 && p.plane_off[i] % 16 == 0;
  p.vec16 = v16;
  p.atomic = accumulate || ksplit > 1;
  if (ksplit > 1 && !accumulate) {
    const cudaError_t e = cudaMemsetAsync(p.out, 0, out_rows * p.ldo * sizeof(float), stream);
    if (e != cudaSuccess) return fail(err, errlen, cudaGetErrorString(e));
  }
  const dim3 grid(static_cast<unsigned>(tiles * ksplit), chunks, jobs.n), block(32 * warps);
  if (plan) *plan = Plan{nt, xlo, warps, p.ksplit, gps, kr, (int)grid.x, (int)grid.y, (int)grid.z, smem};
  const cudaError_t e = p.scheme == kMsb ? launch_msb(xlo, nt, p, jobs, grid, block, smem, stream)
                                         : launch_mwq(xlo, nt, p, jobs, grid, block, smem, stream);
  if (e != cudaSuccess) return fail(err, errlen, cudaGetErrorString(e));
  return 0;
}

}  // namespace edge_moe
