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
#include <bit>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fedlora {
namespace {

constexpr int64_t kLowPrecisionRowBlock = 256;

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

// CPU: B_s [m, R] float32 in one parallel pass over the rows, scaling while copying (at::cat followed
// by a scaling multiply would stream B_s twice, which costs a visible share of the GEMM at m = 1024).
//
// The stacked factors live in a per-thread workspace that grows to the largest call and is reused: a
// fresh multi-megabyte buffer per call is a fresh mmap, whose page faults cost ~15% of a GEMM at m = 1024.
float* cpu_workspace(int64_t floats) {
  thread_local at::Tensor workspace;
  if (!workspace.defined() || workspace.numel() < floats) {
    workspace = at::empty({floats}, at::TensorOptions().dtype(at::kFloat));
  }
  return workspace.mutable_data_ptr<float>();
}

// float -> out_t as c10 rounds it (round to nearest even, NaN to the quiet NaN), written branch-free so
// the stacking loops vectorise (c10's bfloat16 constructor branches per element).
template <typename out_t>
inline out_t round_to(float v) {
  if constexpr (std::is_same_v<out_t, at::BFloat16>) {
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const uint16_t rounded = static_cast<uint16_t>((bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16);
    return at::BFloat16(v != v ? uint16_t{0x7FC0} : rounded, at::BFloat16::from_bits());
  } else {
    return static_cast<out_t>(v);
  }
}

// B_s [m, R] into `out` (float32, or bfloat16 for a bfloat16 GEMM: the float32 value rounded once), row by
// row, each client's columns scaled by scale * w_k.
template <typename out_t>
void stack_scaled_columns_cpu(at::TensorList Bs,  // each [m, r_k]
                              const at::Tensor& weights, double scale, int64_t total_rank, out_t* out) {
  const int64_t m = Bs[0].size(0);
  const size_t K = Bs.size();
  std::vector<at::Tensor> blocks;
  std::vector<const void*> sources;  // raw pointers and widths, read once: a data-pointer call per row
  std::vector<int64_t> ranks;        // and block costs more than copying a rank-8 row
  std::vector<float> block_scale;
  const float* w = weights.const_data_ptr<float>();
  for (size_t k = 0; k < K; ++k) {
    blocks.push_back(Bs[k].contiguous());
    sources.push_back(blocks.back().const_data_ptr());
    ranks.push_back(blocks.back().size(1));
    block_scale.push_back(static_cast<float>(scale * w[k]));
  }
  FEDLORA_DISPATCH_FLOATING(Bs[0].scalar_type(), "fedlora_stack_scaled_columns", [&] {
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      int64_t column = 0;
      for (size_t k = 0; k < K; ++k) {  // block by block: each inner loop is a fixed-width strided copy
        const int64_t r = ranks[k];
        const scalar_t* src = static_cast<const scalar_t*>(sources[k]) + begin * r;
        out_t* dst = out + begin * total_rank + column;
        const float s = block_scale[k];
        for (int64_t row = begin; row < end; ++row, src += r, dst += total_rank) {
          for (int64_t c = 0; c < r; ++c) dst[c] = round_to<out_t>(s * static_cast<float>(src[c]));
        }
        column += r;
      }
    });
  });
}

// A_s [R, n] into `out`: the rows of every A_k in order, in out_t (float32, or the factors' own
// bfloat16), one parallel pass (a copy_ per client would pay TensorIterator's set-up K times).
template <typename out_t>
void stack_rows_cpu(at::TensorList As,  // each [r_k, n]
                    int64_t n, out_t* out) {
  std::vector<at::Tensor> blocks;
  std::vector<int64_t> first_row;
  int64_t rows = 0;
  for (const at::Tensor& A : As) {
    blocks.push_back(A.contiguous());
    first_row.push_back(rows);
    rows += A.size(0);
  }
  FEDLORA_DISPATCH_FLOATING(As[0].scalar_type(), "fedlora_stack_rows", [&] {
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* src = blocks[k].const_data_ptr<scalar_t>();
        out_t* dst = out + first_row[k] * n;
        const int64_t count = blocks[k].numel();
        if constexpr (std::is_same_v<scalar_t, out_t>) {
          std::memcpy(dst, src, sizeof(out_t) * count);
        } else {
          for (int64_t e = 0; e < count; ++e) dst[e] = round_to<out_t>(static_cast<float>(src[e]));
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
      stack_scaled_columns_cpu(Bs, weights.contiguous(), scale, total_rank, buffer);
      stack_rows_cpu(As, n, buffer + m * total_rank);
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
