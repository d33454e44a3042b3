// stacked_delta and stacked_delta_: scale * sum_k w_k B_k @ A_k (FLoRA's stacking, FedEx-LoRA's
// residual), for CPU and CUDA tensors alike: the host code below is only ATen calls (cat, index_select,
// mm / addmm_, which reach BLAS on the CPU and cuBLAS on CUDA), so both backends register it. The K
// products are one GEMM on the stacked factors
//   B_s = [w_1 B_1, ..., w_K B_K] [m, R],  A_s = [A_1; ...; A_K] [R, n],  R = sum_k r_k,
// and the in-place form lets the GEMM accumulate straight into W (beta = 1), never building the [m, n]
// delta. The factors are stacked in float32. Low-precision W:
//   CPU:  updated in row blocks through a float32 copy of the block, so the sum is accumulated in float32
//         and rounded once; bfloat16 W on the AVX-512 path of a CPU with AVX512-BF16 goes the CUDA way
//         (oneDNN's bfloat16 GEMM accumulates in float32 and is 2-3x faster than the float32 one there).
//   CUDA: W.addmm_ in W's dtype on the stacked factors rounded to that dtype: cuBLAS accumulates
//         bfloat16/float16 GEMMs in float32 and rounds W once, with no float32 copy of W; the price is
//         one extra rounding of w_k * scale * B_k to W's dtype (A_k is exact).
// Nothing here synchronises with a GPU: the column-to-client map reaches the device by a non_blocking
// copy from pinned memory.
#include "common/checks.h"
#include "common/cpu_loops.h"
#include "common/cpu_path.h"
#include "common/dispatch.h"

#include <ATen/Parallel.h>

#include <ATen/DeviceGuard.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fedlora {
namespace {

constexpr int64_t kLowPrecisionRowBlock = 256;
constexpr int64_t kRowTile = 32;           // rows of B_s stacked together
constexpr int64_t kMinTaskValues = 16384;  // values a stacking task copies at least: a thread wakes for no less

// [R] int64 on `device`: the client k of every stacked column. Built in pinned memory when `device` is
// a GPU, so the copy is asynchronous (the pinned block is held until the copy ran).
at::Tensor column_clients(at::TensorList Bs, int64_t total_rank, const at::Device& device) {
  at::Tensor ids = at::empty({total_rank}, at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
  int64_t* id = ids.mutable_data_ptr<int64_t>();
  for (int64_t k = 0; k < static_cast<int64_t>(Bs.size()); ++k) {
    for (int64_t r = 0; r < Bs[k].size(1); ++r) *id++ = k;
  }
  return ids.to(device, at::kLong, /*non_blocking=*/true);  // the same tensor on the CPU
}

// CPU: the stacked factors live in a per-thread workspace that grows to the largest call and is reused: a
// fresh multi-megabyte buffer per call is a fresh mmap, whose page faults cost ~15% of a GEMM at m = 1024.
float* cpu_workspace(int64_t floats) {
  thread_local at::Tensor workspace;
  if (!workspace.defined() || workspace.numel() < floats) {
    workspace = at::empty({floats}, at::TensorOptions().dtype(at::kFloat));
  }
  return workspace.mutable_data_ptr<float>();
}

// B_s [m, R] into `b_out` (each client's columns scaled by scale * w_k) and A_s [R, n] into `a_out` (the
// rows of every A_k in order), in out_t: float32, or bfloat16 for a bfloat16 GEMM (the float32 value rounded
// once). B_s is scaled while copied (at::cat and then a multiply would stream it twice). One parallel
// region, each task a share of B_s's rows and of A_s's rows: a region per factor paid a second fork and
// join, a visible share of the GEMM at m = 1024 on two threads.
template <typename out_t>
void stack_cpu(at::TensorList Bs, at::TensorList As,  // each [m, r_k] and [r_k, n]
               const at::Tensor& weights, double scale, int64_t total_rank, out_t* b_out, out_t* a_out) {
  const int64_t m = Bs[0].size(0), n = As[0].size(1);
  const size_t K = Bs.size();
  std::vector<at::Tensor> blocks;   // contiguous factors, kept alive while their pointers are in use
  std::vector<const void*> b_data;  // raw pointers and widths, read once: a data-pointer call per row
  std::vector<int64_t> ranks;       // and block costs more than copying a rank-8 row
  std::vector<float> block_scale;
  std::vector<const void*> a_rows;  // A_s row j's source row
  const float* w = weights.const_data_ptr<float>();
  const int64_t a_row_bytes = n * As[0].element_size();
  for (size_t k = 0; k < K; ++k) {
    blocks.push_back(Bs[k].contiguous());
    b_data.push_back(blocks.back().const_data_ptr());
    ranks.push_back(blocks.back().size(1));
    block_scale.push_back(static_cast<float>(scale * w[k]));
    blocks.push_back(As[k].contiguous());
    const char* a = static_cast<const char*>(blocks.back().const_data_ptr());
    for (int64_t j = 0; j < As[k].size(0); ++j) a_rows.push_back(a + j * a_row_bytes);
  }
  const int64_t values = (m + n) * total_rank;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), values / kMinTaskValues));
  FEDLORA_DISPATCH_FLOATING(Bs[0].scalar_type(), "fedlora_stack_factors", [&] {
    at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t end_task) {
      for (int64_t t = first_task; t < end_task; ++t) {
        for (int64_t row = m * t / tasks, end = m * (t + 1) / tasks; row < end; row += kRowTile) {
          const int64_t rows = std::min(kRowTile, end - row);  // a tile of rows stays in L1 meanwhile
          int64_t column = 0;
          for (size_t k = 0; k < K; ++k) {  // block by block: a strided copy of r_k-wide rows
            const int64_t r = ranks[k];
            loops::scale_rows(b_out + row * total_rank + column, total_rank,
                              static_cast<const scalar_t*>(b_data[k]) + row * r, r, block_scale[k], rows, r);
            column += r;
          }
        }
        for (int64_t j = total_rank * t / tasks, end = total_rank * (t + 1) / tasks; j < end; ++j) {
          const auto* src = static_cast<const scalar_t*>(a_rows[j]);
          if constexpr (std::is_same_v<scalar_t, out_t>) {
            std::memcpy(a_out + j * n, src, sizeof(out_t) * n);
          } else {
            loops::scale_rows(a_out + j * n, n, src, n, 1.0f, 1, n);  // x 1 is exact: a conversion
          }
        }
      }
    });
  });
}

// B_s [m, R] with column block k scaled by scale * w_k, and A_s [R, n], both float32, or both bfloat16 for
// a bfloat16 GEMM on the CPU (`dtype`; CUDA stacks in float32 and its caller rounds).
std::pair<at::Tensor, at::Tensor> stack_factors(at::TensorList Bs, at::TensorList As,
                                                const at::Tensor& weights,  // [K] float32
                                                double scale, int64_t total_rank,
                                                at::ScalarType dtype = at::kFloat) {
  if (weights.is_cpu()) {
    const int64_t m = Bs[0].size(0), n = As[0].size(1);
    const auto options = at::TensorOptions().dtype(dtype);
    auto stack = [&](auto* buffer) -> std::pair<at::Tensor, at::Tensor> {
      stack_cpu(Bs, As, weights.contiguous(), scale, total_rank, buffer, buffer + m * total_rank);
      return {at::from_blob(buffer, {m, total_rank}, options),
              at::from_blob(buffer + m * total_rank, {total_rank, n}, options)};
    };
    float* buffer = cpu_workspace(total_rank * (m + n));  // bfloat16 uses half of it
    if (dtype == at::kBFloat16) return stack(reinterpret_cast<at::BFloat16*>(buffer));
    return stack(buffer);
  }
  const at::Tensor clients = column_clients(Bs, total_rank, weights.device());
  const at::Tensor column_scale = weights.index_select(0, clients).mul_(scale);  // [R]
  at::Tensor B_s = at::cat(Bs, 1).to(at::kFloat).mul_(column_scale);
  at::Tensor A_s = at::cat(As, 0).to(at::kFloat);
  return {B_s, A_s};
}

at::Tensor stacked_delta_impl(at::TensorList Bs, at::TensorList As, const at::Tensor& weights,
                              double scale) {
  const StackedLayout layout = check_stacked("stacked_delta", Bs, As, weights, scale, /*allow_empty=*/false);
  if (layout.total_rank == 0 || layout.m == 0 || layout.n == 0) {
    return at::zeros({layout.m, layout.n}, Bs[0].options());
  }
  const at::OptionalDeviceGuard guard(at::device_of(Bs[0]));
  auto [B_s, A_s] = stack_factors(Bs, As, weights, scale, layout.total_rank);
  return at::mm(B_s, A_s).to(Bs[0].scalar_type());
}

void stacked_delta_inplace_impl(const at::Tensor& W, at::TensorList Bs, at::TensorList As,
                                const at::Tensor& weights, double scale, bool transpose) {
  const StackedLayout layout = check_stacked("stacked_delta_", Bs, As, weights, scale, /*allow_empty=*/true);
  check_stacked_target(W, Bs, As, layout, transpose);
  if (Bs.empty() || layout.total_rank == 0 || W.numel() == 0) return;
  const at::OptionalDeviceGuard guard(at::device_of(W));
  // cuBLAS, and oneDNN on a CPU with bfloat16 dot products: float32 accumulation inside the
  // low-precision GEMM, W rounded once (see the top).
  const bool cpu_bf16_gemm = W.is_cpu() && W.scalar_type() == at::kBFloat16 && cpu_path_has_bf16_dot();
  auto [B_s, A_s] = stack_factors(Bs, As, weights, scale, layout.total_rank,
                                  cpu_bf16_gemm ? at::kBFloat16 : at::kFloat);
  // W [rows, cols] += left [rows, R] @ right [R, cols]
  const at::Tensor left = transpose ? A_s.t() : B_s;
  const at::Tensor right = transpose ? B_s.t() : A_s;
  if (W.scalar_type() == at::kFloat || cpu_bf16_gemm) {
    W.addmm_(left, right);
    return;
  }
  if (W.is_cuda()) {
    W.addmm_(left.to(W.scalar_type()), right.to(W.scalar_type()));
    return;
  }
  for (int64_t r0 = 0; r0 < W.size(0); r0 += kLowPrecisionRowBlock) {
    const int64_t rows = std::min(kLowPrecisionRowBlock, W.size(0) - r0);
    at::Tensor block = W.narrow(0, r0, rows);
    block.copy_(block.to(at::kFloat).addmm_(left.narrow(0, r0, rows), right));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CPU, m) {
  m.impl("stacked_delta", &stacked_delta_impl);
  m.impl("stacked_delta_", &stacked_delta_inplace_impl);
}

#ifdef FEDLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  m.impl("stacked_delta", &stacked_delta_impl);
  m.impl("stacked_delta_", &stacked_delta_inplace_impl);
}
#endif

}  // namespace fedlora
