// stacked_delta and stacked_delta_: scale * sum_k w_k B_k @ A_k (FLoRA's stacking, FedEx-LoRA's
// residual). The K products are one GEMM on the stacked factors
//   B_s = [w_1 B_1, ..., w_K B_K] [m, R],  A_s = [A_1; ...; A_K] [R, n],  R = sum_k r_k,
// and the in-place form lets BLAS accumulate straight into W (beta = 1), never building the [m, n]
// delta. Low-precision W is updated in row blocks through a float32 copy of the block, so the sum is
// accumulated in float32 and rounded once.
#include "common/checks.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fedlora {
namespace {

constexpr int64_t kLowPrecisionRowBlock = 256;

// float32 B_s [m, R] with column block k scaled by scale * w_k, and float32 A_s [R, n].
std::pair<at::Tensor, at::Tensor> stack_factors(at::TensorList Bs, at::TensorList As,
                                                const at::Tensor& weights, double scale) {
  std::vector<int64_t> ranks;
  for (const at::Tensor& B : Bs) ranks.push_back(B.size(1));
  const at::Tensor rank_counts = at::tensor(ranks, at::TensorOptions().dtype(at::kLong)).to(weights.device());
  const at::Tensor column_scale = at::repeat_interleave(weights, rank_counts).mul_(scale);  // [R]
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
  auto [B_s, A_s] = stack_factors(Bs, As, weights, scale);
  return at::mm(B_s, A_s).to(Bs[0].scalar_type());
}

void stacked_delta_inplace_impl(const at::Tensor& W, at::TensorList Bs, at::TensorList As,
                                const at::Tensor& weights, double scale, bool transpose) {
  const StackedLayout layout = check_stacked("stacked_delta_", Bs, As, weights, scale, /*allow_empty=*/true);
  check_stacked_target(W, Bs, As, layout, transpose);
  if (Bs.empty() || layout.total_rank == 0 || W.numel() == 0) return;
  auto [B_s, A_s] = stack_factors(Bs, As, weights, scale);
  // W [rows, cols] += left [rows, R] @ right [R, cols]
  const at::Tensor left = transpose ? A_s.t() : B_s;
  const at::Tensor right = transpose ? B_s.t() : A_s;
  if (W.scalar_type() == at::kFloat) {
    W.addmm_(left, right);
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

}  // namespace fedlora
