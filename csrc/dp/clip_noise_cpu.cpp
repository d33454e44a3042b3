// CPU kernels of per_sample_norms and dp_clip_noise (DP-SGD, Abadi et al. 2016; opacus DPOptimizer).
//
// Two passes over the per-sample gradients of all tensors of a call, each one parallel loop over the
// column chunks of every tensor: pass 1 sums squares per sample, pass 2 clips, sums over the batch,
// adds the noise stream and divides by the denominator (dp_clip_noise_with_sum also writes the clipped
// sum from that pass, for opacus's p.summed_grad). Partial sums are reduced in a fixed order,
// so results do not depend on the thread count.
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/cpu_loops.h"
#include "common/chunks.h"
#include "common/normal_cpu.h"
#include "dp/clip_noise_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace fedlora {
namespace {

constexpr int64_t kChunkWidth = 4096;  // columns per work item: one float32 row of it fits in L1
// Each g_j as a contiguous [B, D_j] matrix (a copy only for non-contiguous input).
struct Flattened {
  std::vector<at::Tensor> matrices;
  std::vector<int64_t> widths;  // D_j
};

Flattened flatten_per_sample(at::TensorList grads) {
  Flattened f;
  for (const at::Tensor& g : grads) {
    f.matrices.push_back(g.contiguous());
    f.widths.push_back(c10::multiply_integers(g.sizes().slice(1)));  // D_j, also when B = 0
  }
  return f;
}

// float32 [B]: n_i = sqrt(sum_j ||g_j[i]||^2).
at::Tensor norms_of(const Flattened& f, int64_t B, at::ScalarType dtype) {
  at::Tensor norms = at::empty({B}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return norms;
  const std::vector<Chunk> chunks = plan_chunks(f.widths, kChunkWidth);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<float> partial(static_cast<size_t>(n_chunks * B), 0.0f);  // [chunk, sample]
  FEDLORA_DISPATCH_FLOATING(dtype, "fedlora_per_sample_norms", [&] {
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        const int64_t width = f.widths[chunk.tensor];
        const scalar_t* g = f.matrices[chunk.tensor].const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < B; ++i) {
          partial[c * B + i] = loops::sum_squares(g + i * width + chunk.begin, chunk.end - chunk.begin);
        }
      }
    });
  });
  float* out = norms.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    float total = 0.0f;
    for (int64_t c = 0; c < n_chunks; ++c) total += partial[c * B + i];
    out[i] = std::sqrt(total);
  }
  return norms;
}

at::Tensor per_sample_norms_cpu(at::TensorList per_sample_grads) {
  const int64_t B = check_per_sample_grads("per_sample_norms", per_sample_grads);
  const Flattened f = flatten_per_sample(per_sample_grads);
  return norms_of(f, B, per_sample_grads[0].scalar_type());
}

// One read of the per-sample gradients gives the clipped sum a_j = sum_i c_i g_j[i] in float32; outs_j =
// (a_j + noise_std z_j) / denominator and, with keep_sums, sums_j = a_j, both rounded once from a_j.
ClipNoiseResult clip_noise(const char* op, at::TensorList per_sample_grads, double max_norm,
                           double noise_multiplier, double denominator, int64_t seed, int64_t offset,
                           bool keep_sums) {
  const int64_t B = check_per_sample_grads(op, per_sample_grads);
  check_clip_noise_scalars(op, max_norm, noise_multiplier, denominator, seed, offset);
  const at::ScalarType dtype = per_sample_grads[0].scalar_type();
  const Flattened f = flatten_per_sample(per_sample_grads);
  ClipNoiseResult result;
  result.norms = norms_of(f, B, dtype);

  // c_i = min(1, C / (n_i + 1e-6)), exactly as opacus computes it.
  std::vector<float> clip(static_cast<size_t>(B));
  const float* n = result.norms.const_data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    // NaN stays NaN (as in the twin and opacus): std::min(1, NaN) would be 1 and let a poisoned sample
    // through unclipped, the rest of its coordinates with it.
    const float c = static_cast<float>(max_norm) / (n[i] + 1e-6f);
    clip[i] = std::isnan(c) ? c : std::min(1.0f, c);
  }

  for (const at::Tensor& g : per_sample_grads) {
    const auto options = g.options().memory_format(at::MemoryFormat::Contiguous);
    result.outs.push_back(at::empty(g.sizes().slice(1), options));
    if (keep_sums) result.sums.push_back(at::empty(g.sizes().slice(1), options));
  }
  const std::vector<Chunk> chunks = plan_chunks(f.widths, kChunkWidth);
  const std::vector<int64_t> starts = list_offsets(f.widths);
  const float noise_std = static_cast<float>(noise_multiplier * max_norm);
  const float inv_denominator = static_cast<float>(1.0 / denominator);
  const bool add_noise = noise_multiplier > 0;

  FEDLORA_DISPATCH_FLOATING(dtype, "fedlora_dp_clip_noise", [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(kChunkWidth), noise(kChunkWidth);
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        const int64_t width = f.widths[chunk.tensor];
        const int64_t len = chunk.end - chunk.begin;
        const scalar_t* g = f.matrices[chunk.tensor].const_data_ptr<scalar_t>() + chunk.begin;
        float* a = acc.data();
        std::fill(a, a + len, 0.0f);
        // Four samples per sweep: a quarter of the accumulator traffic, four read streams in flight.
        int64_t i = 0;
        for (; i + 4 <= B; i += 4) {
          const scalar_t* rows[4] = {g + i * width, g + (i + 1) * width, g + (i + 2) * width, g + (i + 3) * width};
          loops::axpy4(a, rows, &clip[i], len);
        }
        for (; i < B; ++i) loops::axpy(a, g + i * width, clip[i], len);
        if (keep_sums) loops::store(result.sums[chunk.tensor].data_ptr<scalar_t>() + chunk.begin, a, len);
        scalar_t* out = result.outs[chunk.tensor].data_ptr<scalar_t>() + chunk.begin;
        if (add_noise) {
          float* z = noise.data();
          fill_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                       starts[chunk.tensor] + chunk.begin, len, z);
          loops::store_noised_scaled(out, a, z, noise_std, inv_denominator, len);
        } else {
          loops::store_scaled(out, a, inv_denominator, len);
        }
      }
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CPU, m) {
  m.impl("per_sample_norms", &per_sample_norms_cpu);
  m.impl("dp_clip_noise", &ClipNoiseOps<&clip_noise>::dp_clip_noise);
  m.impl("dp_clip_noise_with_sum", &ClipNoiseOps<&clip_noise>::dp_clip_noise_with_sum);
}

}  // namespace fedlora
