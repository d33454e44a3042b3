// Standard normals of the fedlora noise stream in device code: the CUDA twin of common/normal_cpu.h
// (the stream itself is defined in common/philox.h and DESIGN.md, "The noise stream").
#pragma once

#include "common/philox.h"

#include <cstdint>

namespace fedlora::cuda {

// (rho cos theta, rho sin theta) with rho = sqrt(-2 ln u0), theta = 2 pi u1, u0, u1 in (0, 1].
// sincospif reduces 2 u1 exactly (as the CPU kernel does); logf and sqrtf are the accurate device
// versions (this library is not built with --use_fast_math).
__device__ __forceinline__ void box_muller(float u0, float u1, float& z0, float& z1) {
  const float rho = sqrtf(-2.0f * logf(u0));
  float s, c;
  sincospif(2.0f * u1, &s, &c);
  z0 = rho * c;
  z1 = rho * s;
}

// z[t] = the normal of stream element 4 * group + t, t = 0..3: one Philox4x32-10 block with key
// (lo32(seed), hi32(seed)) and counter (lo32(group), hi32(group), lo32(offset), hi32(offset)).
__device__ __forceinline__ void stream_normals4(uint64_t seed, uint64_t offset, uint64_t group, float z[4]) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < philox::kRounds; ++r) {
    philox::round(c0, c1, c2, c3, k0, k1);
    k0 += philox::kRoundA;
    k1 += philox::kRoundB;
  }
  box_muller(philox::uniform(c0), philox::uniform(c1), z[0], z[1]);
  box_muller(philox::uniform(c2), philox::uniform(c3), z[2], z[3]);
}

}  // namespace fedlora::cuda
