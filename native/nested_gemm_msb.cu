// Kernel instances for the "msb" scheme (one file per scheme so that ninja compiles them in parallel).
#include "nested_gemm.cuh"

namespace edge_moe {

cudaError_t launch_msb(bool xlo, int nt, const Params& p, const Jobs& j, dim3 grid, dim3 block,
                       size_t smem, cudaStream_t stream) {
  return launch_scheme<kMsb>(xlo, nt, p, j, grid, block, smem, stream);
}

int occupancy_msb(bool xlo, int nt, size_t smem) { return occupancy_scheme<kMsb>(xlo, nt, smem); }

}  // namespace edge_moe
