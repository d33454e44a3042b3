// CUDA kernel of gaussian_noise_, the twin of gaussian_noise_cpu.cpp: x += std * z over a list of
// tensors, z the fedlora noise stream (common/philox.h) indexed by the element's position in the
// flattened list. One launch for the whole list: one thread per Philox block, i.e. 4 consecutive stream
// elements (which may straddle two tensors), with one aligned vector load/store when the 4 lie in one
// tensor. Memory traffic: every element read once and written once (plus a copy in and out for
// non-contiguous tensors, as on the CPU).
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/cuda_utils.cuh"
#include "common/normal_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fedlora {
namespace {

using cuda::Pack;

// Tensor j of the list as the kernel sees it.
struct NoiseDesc {
  void* data;     // [numel] contiguous, scalar_t
  int64_t numel;
  int64_t start;  // index of its first element in the flattened list (noise stream index)
};

// x[e] += std * z_e for the elements e = 4q .. 4q + 3 of the flattened list, one q per thread.
template <typename scalar_t>
__global__ void add_noise_kernel(const NoiseDesc* descs,  // [J]
                                 int64_t n_tensors, int64_t total, uint64_t seed, uint64_t offset,
                                 float std) {
  const int64_t quads = (total + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride) {
    float z[4];
    cuda::stream_normals4(seed, offset, static_cast<uint64_t>(q), z);
    const int64_t e0 = 4 * q;
    const int n = static_cast<int>(std::min<int64_t>(4, total - e0));
    int64_t j = cuda::find_tensor(descs, n_tensors, e0);
    scalar_t* x = static_cast<scalar_t*>(descs[j].data) + (e0 - descs[j].start);
    if (n == 4 && e0 + 4 <= descs[j].start + descs[j].numel && cuda::is_aligned<4>(x)) {
      Pack<scalar_t, 4> v = *reinterpret_cast<const Pack<scalar_t, 4>*>(x);
#pragma unroll
      for (int t = 0; t < 4; ++t) v.v[t] = static_cast<scalar_t>(static_cast<float>(v.v[t]) + std * z[t]);
      *reinterpret_cast<Pack<scalar_t, 4>*>(x) = v;
      continue;
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (t >= n) break;
      const int64_t e = e0 + t;
      while (e >= descs[j].start + descs[j].numel) ++j;
      scalar_t* xe = static_cast<scalar_t*>(descs[j].data) + (e - descs[j].start);
      *xe = static_cast<scalar_t>(static_cast<float>(*xe) + std * z[t]);
    }
  }
}

void gaussian_noise_cuda(at::TensorList tensors,  // each [...], updated in place
                         double std, int64_t seed, int64_t offset) {
  check_noise_targets(tensors, std, seed, offset);
  if (tensors.empty() || std == 0.0) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());

  // Contiguous buffers in the tensor's logical (row-major) order; a strided tensor gets a contiguous
  // copy that is written back afterwards.
  std::vector<at::Tensor> buffers;
  std::vector<NoiseDesc> descs;
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    buffers.push_back(t.contiguous());
    descs.push_back({buffers.back().mutable_data_ptr(), t.numel(), total});
    total += t.numel();
  }
  if (total == 0) return;

  cuda::DeviceTables tables;
  const size_t at_descs = tables.add(descs);
  const at::Tensor blob = tables.upload(tensors[0].device());  // alive until the launch is enqueued
  const int64_t quads = (total + 3) / 4;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FEDLORA_DISPATCH_FLOATING(tensors[0].scalar_type(),
                                  "fedlora_gaussian_noise_cuda", [&] {
    add_noise_kernel<scalar_t><<<cuda::blocks_for(quads, cuda::kThreads), cuda::kThreads, 0, stream>>>(
        cuda::DeviceTables::get<NoiseDesc>(blob, at_descs), static_cast<int64_t>(descs.size()), total,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<float>(std));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for (size_t j = 0; j < tensors.size(); ++j) {
    if (!buffers[j].is_same(tensors[j])) tensors[j].copy_(buffers[j]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  m.impl("gaussian_noise_", &gaussian_noise_cuda);
}

}  // namespace fedlora
