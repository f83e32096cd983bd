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

// mat: scheme, O, N, G, plane_off[8], scale_off, min_off, alpha_off[6] (20 values).
// jobs: (slot, bits, row0, count) per job, flattened. Returns the plan (nt, xlo, warps, ksplit, gps,
// k range, grid x, y, z, shared bytes).
std::vector<int64_t> gemm(torch::Tensor slab, std::vector<int64_t> mat, std::vector<int64_t> jobs,
                          torch::Tensor x, std::optional<torch::Tensor> xidx, bool swiglu,
                          torch::Tensor out, std::optional<torch::Tensor> oidx,
                          std::optional<torch::Tensor> ow, bool accumulate, int64_t blocks_per_sm) {
  TORCH_CHECK(slab.is_cuda() && slab.scalar_type() == torch::kUInt8, "slab must be a uint8 CUDA tensor");
  TORCH_CHECK(slab.dim() == 1 || slab.dim() == 2, "slab must be [B] or [S, B]");
  TORCH_CHECK(slab.stride(-1) == 1, "slab rows must be contiguous");
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a 2-D CUDA tensor with unit stride");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.stride(1) == 1,
              "out must be a 2-D float32 CUDA tensor with unit stride");
  TORCH_CHECK(mat.size() == 20, "mat must hold 20 values");
  TORCH_CHECK(jobs.size() % 4 == 0 && jobs.size() / 4 <= edge_moe::kMaxJobs, "jobs: at most 128 (slot, bits, row0, count)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(slab.data_ptr()) % 8 == 0 && (slab.dim() == 1 || slab.stride(0) % 8 == 0),
              "slab rows must start on 8-byte boundaries");
  c10::cuda::CUDAGuard guard(slab.device());

  edge_moe::Params p{};
  p.slab = slab.data_ptr<uint8_t>();
  p.slab_stride = slab.dim() == 2 ? slab.stride(0) : 0;
  p.scheme = static_cast<int>(mat[0]);
  p.O = static_cast<int>(mat[1]);
  p.N = static_cast<int>(mat[2]);
  p.G = static_cast<int>(mat[3]);
  p.ng = (p.N + p.G - 1) / p.G;
  p.row_bytes = p.ng * p.G / 8;
  for (int i = 0; i < 8; ++i) p.plane_off[i] = mat[4 + i];
  p.scale_off = mat[12];
  p.min_off = mat[13];
  for (int i = 0; i < 6; ++i) p.alpha_off[i] = mat[14 + i];
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
  j.n = static_cast<int>(jobs.size() / 4);
  for (int i = 0; i < j.n; ++i) {
    j.slot[i] = static_cast<int>(jobs[4 * i]);
    j.bits[i] = static_cast<int>(jobs[4 * i + 1]);
    j.row0[i] = static_cast<int>(jobs[4 * i + 2]);
    j.count[i] = static_cast<int>(jobs[4 * i + 3]);
  }
  edge_moe::Plan plan{};
  char err[256] = {0};
  const int rc = edge_moe::launch_nested_gemm(p, j, accumulate, out.size(0), static_cast<int>(blocks_per_sm),
                                              c10::cuda::getCurrentCUDAStream().stream(), &plan, err, sizeof(err));
  TORCH_CHECK(rc == 0, "nested_gemm: ", err);
  return {plan.nt, plan.xlo, plan.warps, plan.ksplit, plan.gps, plan.kr,
          plan.grid_x, plan.grid_y, plan.grid_z, plan.smem};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "bit-plane GEMV/GEMM over expert slots (native/README.md)");
}
