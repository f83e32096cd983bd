// Kernel instances for the "mwq" scheme (one file per scheme so that ninja compiles them in parallel).
#include "nested_gemm.cuh"

namespace edge_moe {

cudaError_t launch_mwq(bool xlo, int nt, const Params& p, const Jobs& j, dim3 grid, dim3 block,
                       size_t smem, cudaStream_t stream) {
  return launch_scheme<kMwq>(xlo, nt, p, j, grid, block, smem, stream);
}

int occupancy_mwq(bool xlo, int nt, size_t smem) { return occupancy_scheme<kMwq>(xlo, nt, smem); }

}  // namespace edge_moe
