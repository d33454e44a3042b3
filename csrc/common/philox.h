// The fedlora noise stream (DESIGN.md, "The noise stream"), shared by the CPU and CUDA kernels.
//
// Element e of a call draws from the Philox4x32-10 block with key (lo32(seed), hi32(seed)) and
// counter (lo32(e / 4), hi32(e / 4), lo32(offset), hi32(offset)): the same block as
// at::Philox4_32(seed, /*subsequence=*/offset, /*offset=*/e / 4). Its outputs x0..x3 become uniforms
// u_t = ((x_t >> 8) + 1) * 2^-24 in (0, 1], and Box-Muller turns (u0, u1) into the normals of
// e % 4 = 0, 1 and (u2, u3) into those of e % 4 = 2, 3.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fedlora::philox {

constexpr uint32_t kRoundA = 0x9E3779B9;  // key bumps (golden ratio, sqrt(3) - 1)
constexpr uint32_t kRoundB = 0xBB67AE85;
constexpr uint32_t kMulA = 0xD2511F53;  // round multipliers of Philox4x32
constexpr uint32_t kMulB = 0xCD9E8D57;
constexpr int kRounds = 10;

// One Philox round on (c0, c1, c2, c3) with key (k0, k1), in place.
C10_HOST_DEVICE inline void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                  uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kMulA) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kMulB) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// Uniform in (0, 1] from the top 24 bits: never 0, so log() is finite.
C10_HOST_DEVICE inline float uniform(uint32_t bits) {
  return static_cast<float>((bits >> 8) + 1u) * (1.0f / 16777216.0f);
}

}  // namespace fedlora::philox
