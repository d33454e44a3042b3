// Argument validation shared by the CPU and CUDA host wrappers: every op validates once, here, and
// every message names the argument and shows what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace fedlora {

// per_sample_grads: non-empty, each [B, ...] with one B, one floating dtype, one device. Returns B.
int64_t check_per_sample_grads(const char* op, at::TensorList grads);

// max_norm > 0, noise_multiplier >= 0, denominator > 0 (all finite), seed and offset in [0, 2^63).
void check_clip_noise_scalars(const char* op, double max_norm, double noise_multiplier,
                              double denominator, int64_t seed, int64_t offset);

// tensors (possibly empty): one floating dtype, one device, no overlap (each element gets one draw).
void check_noise_targets(at::TensorList tensors, double std, int64_t seed, int64_t offset);

// The sizes of a weighted_sum call, viewing x_k as [outer, r_k, inner] and out as [outer, R, inner].
struct WeightedSumLayout {
  int64_t rank_dim;
  std::vector<int64_t> out_sizes;
  int64_t outer;
  int64_t inner;
  bool per_rank_weights;  // weights [K, R] rather than [K]
};
WeightedSumLayout check_weighted_sum(at::TensorList xs, const at::Tensor& weights, int64_t rank_dim,
                                     int64_t out_rank);

// The sizes of a stacked_delta call: B_k [m, r_k], A_k [r_k, n], sum_k r_k = total_rank.
struct StackedLayout {
  int64_t m;
  int64_t n;
  int64_t total_rank;
};
StackedLayout check_stacked(const char* op, at::TensorList Bs, at::TensorList As,
                            const at::Tensor& weights, double scale, bool allow_empty);

// W [m, n] (or [n, m] with transpose) matching the factors' dtype and device, safe to write in place.
void check_stacked_target(const at::Tensor& W, at::TensorList Bs, at::TensorList As,
                          const StackedLayout& layout, bool transpose);

}  // namespace fedlora
