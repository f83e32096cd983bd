// Thin torch binding of launch_nested_gemm (edge_moe/kernels/cuda.py builds and calls it).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "nested_gemm.cuh"

namespace {

const int* int_ptr(const std::optional<torch::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == torch::kInt32 && t->is_contiguous(), name,
              " must be a contiguous int32 CUDA tensor");
  return t->data_ptr<int>();
}

int dtype_code(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kFloat32) return edge_moe::kF32;
  if (x.scalar_type() == torch::kFloat16) return edge_moe::kF16;
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x must be float32, float16 or bfloat16");
  return edge_moe::kBF16;
}

}  // namespace

// mat: scheme, O, N, G, byte offset of the matrix's plane rows in a chunk, of its metadata in a chunk.
// jobs: per job (bits, row0, count, byte offset of chunk 0..7 from base's first byte), flattened.
// kernel: 0 auto, 1 nested_gemm_kernel, 2 gemv_kernel. Returns the plan (kernel, token tile, k warps,
// k parts, k range, grid x, y, z, shared bytes, warps per block; gemv_kernel: ring stages for token tile).
std::vector<int64_t> gemm(torch::Tensor base, std::vector<int64_t> mat, std::vector<int64_t> jobs,
                          torch::Tensor x, std::optional<torch::Tensor> xidx, bool swiglu,
                          torch::Tensor out, std::optional<torch::Tensor> oidx,
                          std::optional<torch::Tensor> ow, bool accumulate, int64_t blocks_per_sm,
                          int64_t kernel) {
  TORCH_CHECK(base.is_cuda() && base.scalar_type() == torch::kUInt8, "base must be a uint8 CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base.data_ptr()) % 8 == 0, "base must start on an 8-byte boundary");
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a 2-D CUDA tensor with unit stride");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.stride(1) == 1,
              "out must be a 2-D float32 CUDA tensor with unit stride");
  TORCH_CHECK(mat.size() == 6, "mat must hold 6 values");
  constexpr size_t kPerJob = 11;
  TORCH_CHECK(jobs.size() % kPerJob == 0 && jobs.size() / kPerJob <= edge_moe::kMaxJobs,
              "jobs: at most 64 (bits, row0, count, 8 chunk offsets)");
  c10::cuda::CUDAGuard guard(base.device());

  edge_moe::Params p{};
  p.base = base.data_ptr<uint8_t>();
  p.scheme = static_cast<int>(mat[0]);
  p.O = static_cast<int>(mat[1]);
  p.N = static_cast<int>(mat[2]);
  p.G = static_cast<int>(mat[3]);
  p.ng = (p.N + p.G - 1) / p.G;
  p.row_bytes = p.ng * p.G / 8;
  p.plane_off = mat[4];
  p.meta_off = mat[5];
  p.x = x.data_ptr();
  p.ldx = x.stride(0);
  p.xidx = int_ptr(xidx, "xidx");
  p.xdtype = dtype_code(x);
  p.swiglu = swiglu ? 1 : 0;
  p.out = out.data_ptr<float>();
  p.ldo = out.stride(0);
  p.oidx = int_ptr(oidx, "oidx");
  p.ow = nullptr;
  if (ow.has_value()) {
    TORCH_CHECK(ow->is_cuda() && ow->scalar_type() == torch::kFloat32 && ow->is_contiguous(),
                "ow must be a contiguous float32 CUDA tensor");
    p.ow = ow->data_ptr<float>();
  }

  edge_moe::Jobs j{};
  j.n = static_cast<int>(jobs.size() / kPerJob);
  for (int i = 0; i < j.n; ++i) {
    const int64_t* q = jobs.data() + kPerJob * i;
    j.bits[i] = static_cast<int>(q[0]);
    j.row0[i] = static_cast<int>(q[1]);
    j.count[i] = static_cast<int>(q[2]);
    for (int c = 0; c < 8; ++c) {
      TORCH_CHECK(q[3 + c] >= 0 && q[3 + c] % 8 == 0 && q[3 + c] / 8 <= 0xffffffffLL,
                  "chunk offsets must be non-negative multiples of 8 below 32 GiB");
      j.chunk[i][c] = static_cast<uint32_t>(q[3 + c] / 8);
    }
  }
  edge_moe::Plan plan{};
  char err[256] = {0};
  const int rc = edge_moe::launch_nested_gemm(p, j, accumulate, out.size(0), static_cast<int>(blocks_per_sm),
                                              static_cast<int>(kernel), c10::cuda::getCurrentCUDAStream().stream(),
                                              &plan, err, sizeof(err));
  TORCH_CHECK(rc == 0, "nested_gemm: ", err);
  return {plan.kernel, plan.nt, plan.kw, plan.ksplit, plan.kr, plan.grid_x, plan.grid_y, plan.grid_z, plan.smem,
          plan.warps};
}

// Forces parts of gemv_kernel's plan (0: the planner's) and turns programmatic dependent launch off
// or on, for every later call in this process (benchmarks).
void set_gemv_options(bool pdl, int64_t kw, int64_t nw, int64_t stages) {
  edge_moe::GemvOptions o;
  o.pdl = pdl ? 1 : 0;
  o.kw = static_cast<int>(kw);
  o.nw = static_cast<int>(nw);
  o.stages = static_cast<int>(stages);
  TORCH_CHECK(o.kw == 0 || o.kw == 1 || o.kw == 2 || o.kw == 4 || o.kw == 8, "kw must be 0, 1, 2, 4 or 8");
  TORCH_CHECK(o.nw >= 0 && o.nw <= 8 && (o.nw == 0 || o.kw == 0 || o.nw % o.kw == 0), "nw must be 0..8, a multiple of kw");
  TORCH_CHECK(o.stages == 0 || (o.stages >= 2 && o.stages <= 4), "stages must be 0 or 2..4");
  edge_moe::set_gemv_options(o);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "bit-plane GEMV/GEMM over experts given by chunk addresses (native/README.md)");
  m.def("set_gemv_options", &set_gemv_options, "force gemv_kernel plan parts (0: auto) and PDL on/off");
}
