// Decode kernel instances for the "msb" scheme (gemv.cuh), one per bit class.
#include "gemv.cuh"

namespace edge_moe {

cudaError_t launch_gemv_msb(const Params& p, const Jobs& j, dim3 grid, dim3 block, size_t smem, int bclass,
                            cudaStream_t stream) {
  return launch_gemv<kMsb>(p, j, grid, block, smem, bclass, stream);
}

int occupancy_gemv_msb(int bclass, int threads, size_t smem) { return occupancy_gemv<kMsb>(bclass, threads, smem); }

}  // namespace edge_moe
