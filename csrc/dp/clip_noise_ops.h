// The two clip-and-noise ops over one device's clip_noise, so CPU and CUDA register the same adapters:
// dp_clip_noise returns (outs_j, norms) and dp_clip_noise_with_sum adds the clipped sums_j from the same pass.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace fedlora {

// The tensors of one call: outs_j and, when kept, the clipped sums_j (both g_j.shape[1:]), norms [B] float32.
struct ClipNoiseResult {
  std::vector<at::Tensor> outs;
  std::vector<at::Tensor> sums;
  at::Tensor norms;
};

using ClipNoiseFn = ClipNoiseResult (*)(const char* op, at::TensorList per_sample_grads, double max_norm,
                                        double noise_multiplier, double denominator, int64_t seed,
                                        int64_t offset, bool keep_sums);

template <ClipNoiseFn clip_noise>
struct ClipNoiseOps {
  static std::tuple<std::vector<at::Tensor>, at::Tensor> dp_clip_noise(
      at::TensorList per_sample_grads, double max_norm, double noise_multiplier, double denominator,
      int64_t seed, int64_t offset) {
    ClipNoiseResult r = clip_noise("dp_clip_noise", per_sample_grads, max_norm, noise_multiplier, denominator,
                                   seed, offset, /*keep_sums=*/false);
    return {std::move(r.outs), std::move(r.norms)};
  }

  static std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> dp_clip_noise_with_sum(
      at::TensorList per_sample_grads, double max_norm, double noise_multiplier, double denominator,
      int64_t seed, int64_t offset) {
    ClipNoiseResult r = clip_noise("dp_clip_noise_with_sum", per_sample_grads, max_norm, noise_multiplier,
                                   denominator, seed, offset, /*keep_sums=*/true);
    return {std::move(r.outs), std::move(r.sums), std::move(r.norms)};
  }
};

}  // namespace fedlora
