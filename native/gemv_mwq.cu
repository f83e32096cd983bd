// Decode kernel instance for the "mwq" scheme (gemv.cuh).
#include "gemv.cuh"

namespace edge_moe {

cudaError_t launch_gemv_mwq(const Params& p, const Jobs& j, dim3 grid, size_t smem, cudaStream_t stream) {
  return launch_gemv<kMwq>(p, j, grid, smem, stream);
}

int occupancy_gemv_mwq(size_t smem) { return occupancy_gemv<kMwq>(smem); }

}  // namespace edge_moe
