// CUDA kernel of weighted_sum, the twin of weighted_sum_cpu.cpp: out = sum_k w_k * zero_pad(x_k, R)
// along rank_dim (FedAvg, HetLoRA's zero-padding, LoRA-A2's per-rank weights [K, R]).
//
// As on the CPU, x_k is viewed as [outer, r_k * inner] rows and out as [outer, R * inner] rows, so the
// columns of a row of x_k are the first r_k * inner columns of the same row of out. The K clients are
// read in place through a device table of K (pointer, row width) pairs: no stacked copy. One launch;
// each thread owns kVec consecutive output elements of one row and loops over k in order, skipping the
// padding, in float32. kVec = 16 bytes of scalar_t when every row segment is aligned for it
// (inner % kVec == 0 and 16-byte aligned clients), else 1. FedAvg (every r_k = R, weights [K]) is
// viewed as one row of numel columns, so it vectorises whatever inner is. Memory traffic: every client
// element read once, every output element written once.
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

namespace fedlora {
namespace {

using cuda::Pack;

// Client k as the kernel sees it.
struct ClientDesc {
  const void* data;  // [outer, width] contiguous, scalar_t
  int64_t width;     // r_k * inner
};

// out[row, col .. col + kVec) = sum_k w(k, col / inner) * x_k[row, col ..], zero where col >= r_k * inner.
template <typename scalar_t, int kVec>
__global__ void weighted_sum_kernel(const ClientDesc* clients,  // [K]
                                    int64_t K,
                                    const float* weights,       // [K] or [K, R]
                                    bool per_rank, int64_t R, int64_t inner,
                                    int64_t width,              // R * inner
                                    int64_t groups,             // outer * width / kVec
                                    scalar_t* out) {            // [outer, width]
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t flat = g * kVec;
    const int64_t row = flat / width;
    const int64_t col = flat - row * width;
    const int64_t rank = col / inner;  // the same for the kVec columns: inner % kVec == 0
    float acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const ClientDesc c = clients[k];
      const float w = per_rank ? weights[k * R + rank] : weights[k];
      if (col >= c.width) {  // rank >= r_k: zero padding (c.width % kVec == 0)
        if (!isfinite(w)) {  // w * 0 is NaN, as in the twin: a bad weight must not vanish in the padding
#pragma unroll
          for (int v = 0; v < kVec; ++v) acc[v] += w * 0.0f;
        }
        continue;
      }
      const Pack<scalar_t, kVec> x =
          *reinterpret_cast<const Pack<scalar_t, kVec>*>(static_cast<const scalar_t*>(c.data) + row * c.width + col);
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[v] += w * static_cast<float>(x.v[v]);
    }
    Pack<scalar_t, kVec> y;
#pragma unroll
    for (int v = 0; v < kVec; ++v) y.v[v] = static_cast<scalar_t>(acc[v]);
    *reinterpret_cast<Pack<scalar_t, kVec>*>(out + flat) = y;
  }
}

template <typename scalar_t, int kVec>
void launch(const ClientDesc* clients,  // [K], on the device
            int64_t K,
            const at::Tensor& weights,   // [K] or [K, R] float32, contiguous
            bool per_rank, int64_t R, int64_t inner,
            at::Tensor& out,             // [outer, R * inner] contiguous
            cudaStream_t stream) {
  const int64_t width = R * inner;
  const int64_t groups = out.numel() / kVec;
  weighted_sum_kernel<scalar_t, kVec><<<cuda::blocks_for(groups, cuda::kThreads), cuda::kThreads, 0, stream>>>(
      clients, K, weights.const_data_ptr<float>(), per_rank, R, inner, width, groups,
      out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor weighted_sum_cuda(at::TensorList xs,      // each [..., r_k, ...] (r_k at rank_dim)
                             const at::Tensor& weights,  // [K] or [K, R]
                             int64_t rank_dim, int64_t out_rank) {  // returns [..., R, ...]
  const WeightedSumLayout layout = check_weighted_sum(xs, weights, rank_dim, out_rank);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  at::Tensor out = at::empty(layout.out_sizes, xs[0].options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  // FedAvg (every r_k = R, weights [K]) needs no rank: view every x_k as one row [1, numel], so the
  // vector path does not depend on inner (B factors [m, r] have inner = 1).
  const int64_t K = static_cast<int64_t>(xs.size());
  bool full_rank = !layout.per_rank_weights;
  for (const at::Tensor& x : xs) full_rank &= x.size(layout.rank_dim) == out_rank;
  const int64_t R = full_rank ? 1 : out_rank;
  const int64_t inner = full_rank ? out.numel() : layout.inner;

  // Clients are read in place; only a non-contiguous one is copied first.
  std::vector<at::Tensor> clients;
  std::vector<ClientDesc> descs;
  bool aligned16 = reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  for (const at::Tensor& x : xs) {
    clients.push_back(x.contiguous());
    const int64_t width = full_rank ? inner : x.size(layout.rank_dim) * inner;  // r_k * inner
    descs.push_back({clients.back().const_data_ptr(), width});
    if (width > 0) aligned16 &= reinterpret_cast<uintptr_t>(descs.back().data) % 16 == 0;
  }
  const at::Tensor w = weights.contiguous();
  cuda::DeviceTables tables;
  const size_t at_descs = tables.add(descs);
  const at::Tensor blob = tables.upload(xs[0].device());  // alive until the launch is enqueued
  const ClientDesc* table = cuda::DeviceTables::get<ClientDesc>(blob, at_descs);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FEDLORA_DISPATCH_FLOATING(xs[0].scalar_type(), "fedlora_weighted_sum_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // 4 float, 8 half / bfloat16
    if (aligned16 && inner % kVec == 0) {
      launch<scalar_t, kVec>(table, K, w, layout.per_rank_weights, R, inner, out, stream);
    } else {
      launch<scalar_t, 1>(table, K, w, layout.per_rank_weights, R, inner, out, stream);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  m.impl("weighted_sum", &weighted_sum_cuda);
}

}  // namespace fedlora
