// CUDA side of the dp ops: per_sample_norms, dp_clip_noise and gaussian_noise_. For now a
// registration skeleton; with a CPU torch it is built only by the compile check
// (-DFEDLORA_CUDA_COMPILE_CHECK=ON, .ci/cuda_compile_check.sh).
#include "common/philox.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace fedlora {

// Writes words[w] = x_{w % 4} of block w / 4 of the noise stream for (seed, offset), and
// uniforms[w] = philox::uniform(words[w]). Not an op: it proves common/philox.h compiles for the
// device, and it is the stream the dp kernels will draw from.
__global__ void philox_stream_words_kernel(uint64_t seed, uint64_t offset, int64_t n, uint32_t* words,
                                           float* uniforms) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= n) return;
  const uint64_t block = static_cast<uint64_t>(w) / 4;
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                   static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    if (r > 0) {
      k0 += philox::kRoundA;
      k1 += philox::kRoundB;
    }
    philox::round(c[0], c[1], c[2], c[3], k0, k1);
  }
  const uint32_t bits = c[w % 4];
  words[w] = bits;
  uniforms[w] = philox::uniform(bits);
}

}  // namespace fedlora

TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  // The CUDA kernels of per_sample_norms, dp_clip_noise and gaussian_noise_ come in the next issue.
}
