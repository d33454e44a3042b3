// CUDA kernels of per_sample_norms and dp_clip_noise (DP-SGD, Abadi et al. 2016; opacus DPOptimizer),
// the twins of clip_noise_cpu.cpp. Three launches serve the whole list g_j [B, D_j], whatever its length:
//   1. sum_squares: one block per (column chunk c, sample i) of the chunk table (common/chunks.h)
//      writes partial[c, i] = ||g_j[i, chunk]||^2. Reads every gradient element once.
//   2. norms: one thread per sample sums partial[:, i] in a fixed order (no float atomics, so norms
//      are reproducible run to run) and writes n_i and, for dp_clip_noise, c_i = min(1, C / (n_i + 1e-6)).
//   3. clip_sum_noise: one thread per Philox block, i.e. 4 consecutive elements e of the flattened list,
//      out[e] = (sum_i c_i g[i, e] + std * z_e) / denominator (and for dp_clip_noise_with_sum also the
//      clipped sum itself). Reads every gradient element once more.
// The per-tensor descriptors and the chunk table travel in one pinned buffer with one async copy.
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/chunks.h"
#include "common/cuda_utils.cuh"
#include "common/normal_cuda.cuh"
#include "dp/clip_noise_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fedlora {
namespace {

using cuda::DeviceTables;
using cuda::Pack;

constexpr int64_t kChunkWidth = 2048;  // columns per block of sum_squares: 8 per thread
constexpr int kNormSamples = 32;       // norms kernel: samples per block (threadIdx.x) ...
constexpr int kNormLanes = 8;          // ... times chunk lanes per sample (threadIdx.y)

// Tensor j of the list as the kernels see it.
struct GradDesc {
  const void* grad;  // [B, D] contiguous, scalar_t
  void* out;         // [D] contiguous, scalar_t; null for per_sample_norms
  void* sum;         // [D] contiguous, scalar_t: the clipped sum (dp_clip_noise_with_sum), else null
  int64_t width;     // D = numel of one sample
  int64_t start;     // index of its first output element in the flattened list (noise stream index)
};

struct ClipNoiseParams {
  uint64_t seed;
  uint64_t offset;
  float noise_std;        // noise_multiplier * max_norm
  float inv_denominator;  // 1 / denominator
  bool add_noise;         // noise_multiplier > 0
};

// partial[w] for w = c * B + i: the sum of squares of sample i over chunk c.
template <typename scalar_t>
__global__ void sum_squares_kernel(const GradDesc* descs,  // [J]
                                   const Chunk* chunks,    // [C]
                                   int64_t items,          // C * B
                                   int64_t B,
                                   float* partial) {       // [C, B]
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const Chunk chunk = chunks[w / B];
    const GradDesc d = descs[chunk.tensor];
    const scalar_t* row = static_cast<const scalar_t*>(d.grad) + (w % B) * d.width;
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t c = chunk.begin + threadIdx.x; c < chunk.end; c += blockDim.x) {
      const float v = static_cast<float>(row[c]);
      acc += v * v;
    }
    acc = cuda::block_sum(acc);
    if (threadIdx.x == 0) partial[w] = acc;
  }
}

// norms[i] = sqrt(sum_c partial[c, i]) and clip[i] = min(1, max_norm / (norms[i] + 1e-6)) when clip is
// not null. Lane y of sample i sums chunks y, y + kNormLanes, ...; the lanes are added in order.
__global__ void norms_kernel(const float* partial,  // [C, B]
                             int64_t n_chunks, int64_t B, float max_norm,
                             float* norms,          // [B]
                             float* clip) {         // [B] or null
  __shared__ float lanes[kNormLanes][kNormSamples];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kNormSamples + threadIdx.x;
  float acc = 0.0f;
  if (i < B) {
    for (int64_t c = threadIdx.y; c < n_chunks; c += kNormLanes) acc += partial[c * B + i];
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || i >= B) return;
  float total = 0.0f;
#pragma unroll
  for (int l = 0; l < kNormLanes; ++l) total += lanes[l][threadIdx.x];
  const float n = sqrtf(total);
  norms[i] = n;
  if (clip != nullptr) {  // as opacus computes it; NaN stays NaN (fminf would make it 1: unclipped)
    const float c = max_norm / (n + 1e-6f);
    clip[i] = isnan(c) ? c : fminf(1.0f, c);
  }
}

// Elements e = 4q .. 4q + 3 of the flattened list (one Philox block; they may straddle tensors):
// out[e] = (sum_i clip[i] g[i, e] + noise_std * z_e) * inv_denominator, summed over i in order, and
// sum[e] = sum_i clip[i] g[i, e] where the tensor keeps its clipped sum (null pointers otherwise).
template <typename scalar_t>
__global__ void clip_sum_noise_kernel(const GradDesc* descs,  // [J]
                                      int64_t n_tensors, int64_t total, int64_t B,
                                      const float* clip,      // [B]
                                      ClipNoiseParams p) {
  const int64_t quads = (total + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (p.add_noise) cuda::stream_normals4(p.seed, p.offset, static_cast<uint64_t>(q), z);
    const int64_t e0 = 4 * q;
    const int n = static_cast<int>(std::min<int64_t>(4, total - e0));
    int64_t j = cuda::find_tensor(descs, n_tensors, e0);
    const bool one_tensor = n == 4 && e0 + 4 <= descs[j].start + descs[j].width;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const scalar_t* in[4];
    scalar_t* out[4];
    scalar_t* sum[4];
    int64_t width[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {  // where column t lives: its tensor, its first row, its output
      const int64_t e = e0 + std::min(t, n - 1);
      while (e >= descs[j].start + descs[j].width) ++j;
      const int64_t col = e - descs[j].start;
      in[t] = static_cast<const scalar_t*>(descs[j].grad) + col;
      out[t] = static_cast<scalar_t*>(descs[j].out) + col;
      sum[t] = descs[j].sum == nullptr ? nullptr : static_cast<scalar_t*>(descs[j].sum) + col;
      width[t] = descs[j].width;
    }
    const bool vector = one_tensor && width[0] % 4 == 0 && cuda::is_aligned<4>(in[0]) &&
                        cuda::is_aligned<4>(out[0]) && (sum[0] == nullptr || cuda::is_aligned<4>(sum[0]));
    if (vector) {  // four columns of one tensor: one aligned load per row
#pragma unroll 4
      for (int64_t i = 0; i < B; ++i) {
        const Pack<scalar_t, 4> x = *reinterpret_cast<const Pack<scalar_t, 4>*>(in[0] + i * width[0]);
        const float ci = clip[i];
#pragma unroll
        for (int t = 0; t < 4; ++t) acc[t] += ci * static_cast<float>(x.v[t]);
      }
    } else {
#pragma unroll 2
      for (int64_t i = 0; i < B; ++i) {
        const float ci = clip[i];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if (t < n) acc[t] += ci * static_cast<float>(in[t][i * width[t]]);
        }
      }
    }
    if (vector && sum[0] != nullptr) {
      Pack<scalar_t, 4> y;
#pragma unroll
      for (int t = 0; t < 4; ++t) y.v[t] = static_cast<scalar_t>(acc[t]);
      *reinterpret_cast<Pack<scalar_t, 4>*>(sum[0]) = y;
    } else if (!vector) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (t < n && sum[t] != nullptr) *sum[t] = static_cast<scalar_t>(acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (p.add_noise) acc[t] += p.noise_std * z[t];
      acc[t] *= p.inv_denominator;
    }
    if (vector) {
      Pack<scalar_t, 4> y;
#pragma unroll
      for (int t = 0; t < 4; ++t) y.v[t] = static_cast<scalar_t>(acc[t]);
      *reinterpret_cast<Pack<scalar_t, 4>*>(out[0]) = y;
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (t < n) *out[t] = static_cast<scalar_t>(acc[t]);
      }
    }
  }
}

// The list on the device: contiguous [B, D_j] matrices (a copy only for non-contiguous input, kept
// alive here until the kernels are enqueued), descriptors and chunk table in one uploaded blob.
struct DeviceList {
  std::vector<at::Tensor> matrices;
  at::Tensor blob;
  const GradDesc* descs = nullptr;
  const Chunk* chunks = nullptr;
  int64_t n_tensors = 0;
  int64_t n_chunks = 0;
  int64_t total = 0;  // sum_j D_j: elements of the flattened output list
};

DeviceList upload_list(at::TensorList grads,                  // each [B, ...]
                       const std::vector<at::Tensor>& outs,   // each [...] = grads[j].shape[1:], or none
                       const std::vector<at::Tensor>& sums) {  // like outs, or none
  DeviceList list;
  std::vector<int64_t> widths;
  for (const at::Tensor& g : grads) {
    list.matrices.push_back(g.contiguous());
    widths.push_back(c10::multiply_integers(g.sizes().slice(1)));  // D_j, also when B = 0
  }
  const std::vector<int64_t> starts = list_offsets(widths);
  std::vector<GradDesc> descs;
  for (size_t j = 0; j < grads.size(); ++j) {
    void* out = outs.empty() ? nullptr : outs[j].mutable_data_ptr();
    void* sum = sums.empty() ? nullptr : sums[j].mutable_data_ptr();
    descs.push_back({list.matrices[j].const_data_ptr(), out, sum, widths[j], starts[j]});
  }
  const std::vector<Chunk> chunks = plan_chunks(widths, kChunkWidth);
  DeviceTables tables;
  const size_t at_descs = tables.add(descs);
  const size_t at_chunks = tables.add(chunks);
  list.blob = tables.upload(grads[0].device());
  list.descs = DeviceTables::get<GradDesc>(list.blob, at_descs);
  list.chunks = DeviceTables::get<Chunk>(list.blob, at_chunks);
  list.n_tensors = static_cast<int64_t>(grads.size());
  list.n_chunks = static_cast<int64_t>(chunks.size());
  list.total = widths.empty() ? 0 : starts.back() + widths.back();
  return list;
}

// Launches 1 and 2: norms [B] float32 and, when clip is not null, the clip factors [B]. B > 0.
void launch_norms(const DeviceList& list, int64_t B, at::ScalarType dtype, float max_norm,
                  at::Tensor& norms,  // [B] float32
                  float* clip) {      // [B] or null
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({list.n_chunks, B}, norms.options());  // [C, B]
  if (list.n_chunks > 0) {
    const int64_t items = list.n_chunks * B;
    FEDLORA_DISPATCH_FLOATING(dtype, "fedlora_per_sample_norms_cuda", [&] {
      sum_squares_kernel<scalar_t><<<cuda::blocks_for(items, 1), cuda::kThreads, 0, stream>>>(
          list.descs, list.chunks, items, B, partial.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const unsigned int blocks = static_cast<unsigned int>((B + kNormSamples - 1) / kNormSamples);
  norms_kernel<<<blocks, dim3(kNormSamples, kNormLanes), 0, stream>>>(
      partial.const_data_ptr<float>(), list.n_chunks, B, max_norm, norms.mutable_data_ptr<float>(), clip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor per_sample_norms_cuda(at::TensorList per_sample_grads) {  // each [B, ...]; returns [B] float32
  const int64_t B = check_per_sample_grads("per_sample_norms", per_sample_grads);
  const c10::cuda::CUDAGuard guard(per_sample_grads[0].device());
  at::Tensor norms = at::empty({B}, per_sample_grads[0].options().dtype(at::kFloat));
  if (B == 0) return norms;
  const DeviceList list = upload_list(per_sample_grads, {}, {});
  launch_norms(list, B, per_sample_grads[0].scalar_type(), 0.0f, norms, nullptr);
  return norms;
}

ClipNoiseResult clip_noise(const char* op, at::TensorList per_sample_grads,  // each [B, ...]
                           double max_norm, double noise_multiplier, double denominator, int64_t seed,
                           int64_t offset, bool keep_sums) {
  const int64_t B = check_per_sample_grads(op, per_sample_grads);
  check_clip_noise_scalars(op, max_norm, noise_multiplier, denominator, seed, offset);
  const c10::cuda::CUDAGuard guard(per_sample_grads[0].device());
  const at::ScalarType dtype = per_sample_grads[0].scalar_type();
  ClipNoiseResult result;
  result.norms = at::empty({B}, per_sample_grads[0].options().dtype(at::kFloat));  // [B]
  at::Tensor clip = at::empty({B}, result.norms.options());                        // [B]
  for (const at::Tensor& g : per_sample_grads) {
    const auto options = g.options().memory_format(at::MemoryFormat::Contiguous);
    result.outs.push_back(at::empty(g.sizes().slice(1), options));
    if (keep_sums) result.sums.push_back(at::empty(g.sizes().slice(1), options));
  }
  const DeviceList list = upload_list(per_sample_grads, result.outs, result.sums);
  if (B > 0) {
    launch_norms(list, B, dtype, static_cast<float>(max_norm), result.norms, clip.mutable_data_ptr<float>());
  }
  if (list.total == 0) return result;

  const ClipNoiseParams params{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                               static_cast<float>(noise_multiplier * max_norm),
                               static_cast<float>(1.0 / denominator), noise_multiplier > 0};
  const int64_t quads = (list.total + 3) / 4;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FEDLORA_DISPATCH_FLOATING(dtype, "fedlora_dp_clip_noise_cuda", [&] {
    clip_sum_noise_kernel<scalar_t><<<cuda::blocks_for(quads, cuda::kThreads), cuda::kThreads, 0, stream>>>(
        list.descs, list.n_tensors, list.total, B, clip.const_data_ptr<float>(), params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  m.impl("per_sample_norms", &per_sample_norms_cuda);
  m.impl("dp_clip_noise", &ClipNoiseOps<&clip_noise>::dp_clip_noise);
  m.impl("dp_clip_noise_with_sum", &ClipNoiseOps<&clip_noise>::dp_clip_noise_with_sum);
}

}  // namespace fedlora
