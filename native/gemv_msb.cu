// Decode kernel instance for the "msb" scheme (gemv.cuh).
#include "gemv.cuh"

namespace edge_moe {

cudaError_t launch_gemv_msb(const Params& p, const Jobs& j, dim3 grid, size_t smem, cudaStream_t stream) {
  return launch_gemv<kMsb>(p, j, grid, smem, stream);
}

int occupancy_gemv_msb(size_t smem) { return occupancy_gemv<kMsb>(smem); }

}  // namespace edge_moe
