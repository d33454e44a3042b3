#include "common/checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fedlora {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// One floating dtype and one device for every tensor of `list` (and of `like`, when given).
void check_same_dtype_device(const char* op, const char* name, at::TensorList list,
                             const at::Tensor* like = nullptr, const char* like_name = nullptr) {
  if (list.empty()) return;
  const at::Tensor& ref = like ? *like : list[0];
  const std::string ref_name = like ? like_name : std::string(name) + "[0]";
  TORCH_CHECK(is_supported_dtype(ref.scalar_type()), "fedlora.", op, ": ", ref_name,
              " must be float32, bfloat16 or float16, got ", ref.scalar_type());
  for (size_t k = 0; k < list.size(); ++k) {
    TORCH_CHECK(list[k].defined(), "fedlora.", op, ": ", name, "[", k, "] is an undefined tensor");
    TORCH_CHECK(list[k].scalar_type() == ref.scalar_type(), "fedlora.", op, ": ", name, "[", k,
                "] has dtype ", list[k].scalar_type(), ", expected ", ref.scalar_type(), " like ",
                ref_name);
    TORCH_CHECK(list[k].device() == ref.device(), "fedlora.", op, ": ", name, "[", k,
                "] is on ", list[k].device(), ", expected ", ref.device(), " like ", ref_name);
  }
}

// Whether a and b may write the same element: tensors on different storages never do; on one storage,
// ATen decides, and a layout too strided for it to decide counts as shared (conservative).
bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) return false;
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

// Whether two elements of a 2-D view may share memory. ATen answers only "yes" (a zero stride) or "too
// hard to tell" for non-dense views such as as_strided ones; decide here: with the dims ordered by
// stride, the view is disjoint when the larger stride spans a whole run of the smaller one. Interleaved
// layouts that are disjoint in a subtler way count as overlapping (conservative: clone them).
static bool overlaps_itself_2d(const at::Tensor& t) {
  if (t.dim() != 2 || t.numel() <= 1) return false;
  int64_t s0 = t.stride(0), s1 = t.stride(1), n0 = t.size(0), n1 = t.size(1);
  if (n0 == 1) return n1 > 1 && s1 == 0;
  if (n1 == 1) return s0 == 0;
  if (s0 < s1) {
    std::swap(s0, s1);
    std::swap(n0, n1);
  }
  return s1 < 1 || s0 < n1 * s1;
}

void check_finite(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), "fedlora.", op, ": ", name, " must be finite, got ", value);
}

void check_seed_offset(const char* op, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(seed >= 0, "fedlora.", op, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, "fedlora.", op, ": offset must be in [0, 2^63), got ", offset);
}

void check_weights(const char* op, const at::Tensor& weights, const at::Tensor& like, int64_t K,
                   int64_t out_rank, bool allow_per_rank) {
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "fedlora.", op,
              ": weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK(weights.device() == like.device(), "fedlora.", op, ": weights is on ",
              weights.device(), ", expected ", like.device(), " like the factors");
  const bool per_client = weights.dim() == 1 && weights.size(0) == K;
  const bool per_rank =
      allow_per_rank && weights.dim() == 2 && weights.size(0) == K && weights.size(1) == out_rank;
  if (allow_per_rank) {
    TORCH_CHECK(per_client || per_rank, "fedlora.", op, ": weights must have shape [K] = [", K,
                "] or [K, out_rank] = [", K, ", ", out_rank, "], got ", weights.sizes());
  } else {
    TORCH_CHECK(per_client, "fedlora.", op, ": weights must have shape [K] = [", K, "], got ",
                weights.sizes());
  }
}

}  // namespace

int64_t check_per_sample_grads(const char* op, at::TensorList grads) {
  TORCH_CHECK(!grads.empty(), "fedlora.", op,
              ": per_sample_grads must hold at least one tensor [B, ...], got an empty list");
  check_same_dtype_device(op, "per_sample_grads", grads);
  TORCH_CHECK(grads[0].dim() >= 1, "fedlora.", op,
              ": per_sample_grads[0] must have a batch dimension [B, ...], got a 0-d tensor");
  const int64_t B = grads[0].size(0);
  for (size_t j = 0; j < grads.size(); ++j) {
    TORCH_CHECK(grads[j].dim() >= 1 && grads[j].size(0) == B, "fedlora.", op, ": per_sample_grads[",
                j, "] has shape ", grads[j].sizes(), ", expected a leading batch size B = ", B,
                " like per_sample_grads[0]");
  }
  return B;
}

void check_clip_noise_scalars(const char* op, double max_norm, double noise_multiplier,
                              double denominator, int64_t seed, int64_t offset) {
  check_finite(op, "max_norm", max_norm);
  check_finite(op, "noise_multiplier", noise_multiplier);
  check_finite(op, "denominator", denominator);
  TORCH_CHECK_VALUE(max_norm > 0, "fedlora.", op, ": max_norm must be > 0, got ", max_norm);
  TORCH_CHECK_VALUE(noise_multiplier >= 0, "fedlora.", op, ": noise_multiplier must be >= 0, got ",
                    noise_multiplier);
  TORCH_CHECK_VALUE(denominator > 0, "fedlora.", op,
                    ": denominator (the expected batch size) must be > 0, got ", denominator);
  check_seed_offset(op, seed, offset);
}

void check_noise_targets(at::TensorList tensors, double std, int64_t seed, int64_t offset) {
  const char* op = "gaussian_noise_";
  check_finite(op, "std", std);
  TORCH_CHECK_VALUE(std >= 0, "fedlora.gaussian_noise_: std must be >= 0, got ", std);
  check_seed_offset(op, seed, offset);
  check_same_dtype_device(op, "tensors", tensors);
  for (size_t j = 0; j < tensors.size(); ++j) {
    TORCH_CHECK(at::has_internal_overlap(tensors[j]) != at::MemOverlap::Yes,
                "fedlora.gaussian_noise_: tensors[", j,
                "] has internally overlapping memory (an expanded view); clone it first");
    for (size_t i = 0; i < j; ++i) {
      TORCH_CHECK(!share_memory(tensors[i], tensors[j]),
                  "fedlora.gaussian_noise_: tensors[", i, "] and tensors[", j,
                  "] share memory; every element must receive exactly one draw");
    }
  }
}

WeightedSumLayout check_weighted_sum(at::TensorList xs, const at::Tensor& weights, int64_t rank_dim,
                                     int64_t out_rank) {
  const char* op = "weighted_sum";
  TORCH_CHECK(!xs.empty(), "fedlora.weighted_sum: xs must hold at least one tensor (K >= 1), got "
              "an empty list");
  check_same_dtype_device(op, "xs", xs);
  const at::Tensor& x0 = xs[0];
  const int64_t ndim = x0.dim();
  TORCH_CHECK(ndim >= 1, "fedlora.weighted_sum: xs[0] must have at least one dimension, got a 0-d "
              "tensor");
  TORCH_CHECK(rank_dim >= -ndim && rank_dim < ndim, "fedlora.weighted_sum: rank_dim must be in [",
              -ndim, ", ", ndim - 1, "] for ", ndim, "-d xs, got ", rank_dim);
  TORCH_CHECK_VALUE(out_rank >= 0, "fedlora.weighted_sum: out_rank must be >= 0, got ", out_rank);
  const int64_t dim = rank_dim < 0 ? rank_dim + ndim : rank_dim;
  const int64_t K = static_cast<int64_t>(xs.size());
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& x = xs[k];
    TORCH_CHECK(x.dim() == ndim, "fedlora.weighted_sum: xs[", k, "] has shape ", x.sizes(),
                ", expected ", ndim, " dimensions like xs[0] ", x0.sizes());
    for (int64_t d = 0; d < ndim; ++d) {
      if (d == dim) continue;
      TORCH_CHECK(x.size(d) == x0.size(d), "fedlora.weighted_sum: xs[", k, "] has shape ",
                  x.sizes(), ", expected the sizes of xs[0] ", x0.sizes(),
                  " in every dimension but rank_dim = ", dim);
    }
    TORCH_CHECK(x.size(dim) <= out_rank, "fedlora.weighted_sum: xs[", k, "] has rank ",
                x.size(dim), " along rank_dim = ", dim, " (shape ", x.sizes(),
                "), expected at most out_rank = ", out_rank);
  }
  check_weights(op, weights, x0, K, out_rank, /*allow_per_rank=*/true);

  WeightedSumLayout layout;
  layout.rank_dim = dim;
  layout.out_sizes = x0.sizes().vec();
  layout.out_sizes[dim] = out_rank;
  layout.outer = 1;
  for (int64_t d = 0; d < dim; ++d) layout.outer *= x0.size(d);
  layout.inner = 1;
  for (int64_t d = dim + 1; d < ndim; ++d) layout.inner *= x0.size(d);
  layout.per_rank_weights = weights.dim() == 2;
  return layout;
}

StackedLayout check_stacked(const char* op, at::TensorList Bs, at::TensorList As,
                            const at::Tensor& weights, double scale, bool allow_empty) {
  TORCH_CHECK(Bs.size() == As.size(), "fedlora.", op, ": Bs and As must have the same length K, got ",
              Bs.size(), " and ", As.size());
  TORCH_CHECK(allow_empty || !Bs.empty(), "fedlora.", op,
              ": Bs and As must hold at least one factor pair (K >= 1) to define [m, n], got empty "
              "lists");
  check_finite(op, "scale", scale);
  StackedLayout layout{0, 0, 0};
  if (Bs.empty()) {
    TORCH_CHECK(weights.dim() == 1 && weights.size(0) == 0, "fedlora.", op,
                ": weights must have shape [K] = [0], got ", weights.sizes());
    return layout;
  }
  check_same_dtype_device(op, "Bs", Bs);
  check_same_dtype_device(op, "As", As, &Bs[0], "Bs[0]");
  TORCH_CHECK(Bs[0].dim() == 2, "fedlora.", op, ": Bs[0] must be 2-d [m, r], got shape ",
              Bs[0].sizes());
  TORCH_CHECK(As[0].dim() == 2, "fedlora.", op, ": As[0] must be 2-d [r, n], got shape ",
              As[0].sizes());
  layout.m = Bs[0].size(0);
  layout.n = As[0].size(1);
  for (size_t k = 0; k < Bs.size(); ++k) {
    const at::Tensor& B = Bs[k];
    const at::Tensor& A = As[k];
    TORCH_CHECK(B.dim() == 2 && B.size(0) == layout.m, "fedlora.", op, ": Bs[", k, "] has shape ",
                B.sizes(), ", expected [m, r] with m = ", layout.m, " like Bs[0]");
    TORCH_CHECK(A.dim() == 2 && A.size(1) == layout.n, "fedlora.", op, ": As[", k, "] has shape ",
                A.sizes(), ", expected [r, n] with n = ", layout.n, " like As[0]");
    TORCH_CHECK(A.size(0) == B.size(1), "fedlora.", op, ": As[", k, "] has shape ", A.sizes(),
                ", expected [r, n] with r = ", B.size(1), " to match Bs[", k, "] ", B.sizes());
    layout.total_rank += B.size(1);
  }
  check_weights(op, weights, Bs[0], static_cast<int64_t>(Bs.size()), 0, /*allow_per_rank=*/false);
  return layout;
}

void check_stacked_target(const at::Tensor& W, at::TensorList Bs, at::TensorList As,
                          const StackedLayout& layout, bool transpose) {
  TORCH_CHECK(W.defined(), "fedlora.stacked_delta_: W is an undefined tensor");
  TORCH_CHECK(is_supported_dtype(W.scalar_type()), "fedlora.stacked_delta_: W must be float32, "
              "bfloat16 or float16, got ", W.scalar_type());
  TORCH_CHECK(W.dim() == 2, "fedlora.stacked_delta_: W must be 2-d, got shape ", W.sizes());
  if (!Bs.empty()) {
    const int64_t rows = transpose ? layout.n : layout.m;
    const int64_t cols = transpose ? layout.m : layout.n;
    TORCH_CHECK(W.size(0) == rows && W.size(1) == cols, "fedlora.stacked_delta_: W has shape ",
                W.sizes(), ", expected [", rows, ", ", cols, "] for B [m, r] = [", layout.m,
                ", .] and A [r, n] = [., ", layout.n, "]", transpose ? " with transpose=True" : "");
    TORCH_CHECK(W.scalar_type() == Bs[0].scalar_type(), "fedlora.stacked_delta_: W has dtype ",
                W.scalar_type(), ", expected ", Bs[0].scalar_type(), " like Bs[0]");
    TORCH_CHECK(W.device() == Bs[0].device(), "fedlora.stacked_delta_: W is on ", W.device(),
                ", expected ", Bs[0].device(), " like Bs[0]");
  }
  TORCH_CHECK(!overlaps_itself_2d(W),
              "fedlora.stacked_delta_: W has internally overlapping memory (an expanded or as_strided view "
              "with sizes ", W.sizes(), " and strides ", W.strides(), "); clone it first");
  for (size_t k = 0; k < Bs.size(); ++k) {
    TORCH_CHECK(!share_memory(W, Bs[k]),
                "fedlora.stacked_delta_: W shares memory with Bs[", k, "]; pass a copy");
    TORCH_CHECK(!share_memory(W, As[k]),
                "fedlora.stacked_delta_: W shares memory with As[", k, "]; pass a copy");
  }
}

}  // namespace fedlora
