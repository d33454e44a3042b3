#include "common/normal_cpu.h"

#include "common/philox.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

// The batch generator is compute-bound: build it for AVX2+FMA and AVX-512 too, chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FEDLORA_TARGET_CLONES \
  __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define FEDLORA_TARGET_CLONES
#endif
#define FEDLORA_INLINE inline __attribute__((always_inline))

namespace fedlora {
namespace {

constexpr int kLanes = 32;          // Philox blocks per batch, computed side by side (SIMD lanes)
constexpr int kBatch = 4 * kLanes;  // normals per batch

// ln(u) for u in (0, 1]: split off the exponent, then a minimax polynomial for log1p of the mantissa
// remainder (Cephes logf coefficients). Branch-free so loops over it vectorise; ~1 ulp, and relative-
// accurate near u = 1, where Box-Muller's radius is small.
FEDLORA_INLINE float log_unit(float u) {
  const uint32_t bits = std::bit_cast<uint32_t>(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;  // u = m * 2^e, m in [0.5, 1)
  const float m = std::bit_cast<float>((bits & 0x007FFFFFu) | 0x3F000000u);
  const int32_t low = m < 0.70710678118654752f;  // then use m' = 2m, e' = e - 1
  e -= low;
  const float x = m * (1.0f + static_cast<float>(low)) - 1.0f;  // exact; 1 + x in [sqrt(1/2), sqrt(2))
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;  // ln 2 split in two so fe * ln 2 keeps its low bits
  y += -0.5f * z;
  return (x + y) + 0.693359375f * fe;
}

// (cos 2 pi u, sin 2 pi u) for u in (0, 1]. The quarter-turn reduction is exact because u is a
// multiple of 2^-24; the remainder angle lies in [-pi/4, pi/4] (Cephes sinf/cosf polynomials).
FEDLORA_INLINE void sincos_2pi(float u, float& s, float& c) {
  const float q = static_cast<float>(static_cast<int32_t>(u * 4.0f + 0.5f));  // nearest quarter
  const float a = (u - q * 0.25f) * 6.28318530717958648f;
  const float a2 = a * a;
  const float sp = a + a * a2 * (-1.6666654611e-1f + a2 * (8.3321608736e-3f + a2 * -1.9515295891e-4f));
  const float cp = 1.0f - 0.5f * a2 +
                   a2 * a2 * (4.166664568298827e-2f + a2 * (-1.388731625493765e-3f + a2 * 2.443315711809948e-5f));
  // Rotate by the quadrant with integer selects and sign flips (branch-free, so it vectorises).
  const uint32_t quadrant = static_cast<uint32_t>(q) & 3u;
  const uint32_t swap = 0u - (quadrant & 1u);  // all ones in quadrants 1 and 3
  const uint32_t sp_bits = std::bit_cast<uint32_t>(sp), cp_bits = std::bit_cast<uint32_t>(cp);
  const uint32_t cs = (sp_bits & swap) | (cp_bits & ~swap);
  const uint32_t sn = (cp_bits & swap) | (sp_bits & ~swap);
  c = std::bit_cast<float>(cs ^ (((quadrant + 1u) & 2u) << 30));  // negative in quadrants 1, 2
  s = std::bit_cast<float>(sn ^ ((quadrant & 2u) << 30));         // negative in quadrants 2, 3
}

// The kBatch normals of Philox groups [group, group + kLanes).
FEDLORA_TARGET_CLONES
void normals_batch(uint64_t seed, uint64_t offset, uint64_t group, float* out) {
  // Lanes outer, rounds unrolled inner: the lane loop body is straight-line code that vectorises.
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t offset_lo = static_cast<uint32_t>(offset), offset_hi = static_cast<uint32_t>(offset >> 32);
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t g = group + static_cast<uint64_t>(l);
    uint32_t x0 = static_cast<uint32_t>(g), x1 = static_cast<uint32_t>(g >> 32);
    uint32_t x2 = offset_lo, x3 = offset_hi;
    uint32_t k0 = seed_lo, k1 = seed_hi;
#pragma GCC unroll 10
    for (int r = 0; r < philox::kRounds; ++r) {
      philox::round(x0, x1, x2, x3, k0, k1);
      k0 += philox::kRoundA;
      k1 += philox::kRoundB;
    }
    c0[l] = x0;
    c1[l] = x1;
    c2[l] = x2;
    c3[l] = x3;
  }
  float z0[kLanes], z1[kLanes], z2[kLanes], z3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const float r01 = std::sqrt(-2.0f * log_unit(philox::uniform(c0[l])));
    const float r23 = std::sqrt(-2.0f * log_unit(philox::uniform(c2[l])));
    float s01, cos01, s23, cos23;
    sincos_2pi(philox::uniform(c1[l]), s01, cos01);
    sincos_2pi(philox::uniform(c3[l]), s23, cos23);
    z0[l] = r01 * cos01;
    z1[l] = r01 * s01;
    z2[l] = r23 * cos23;
    z3[l] = r23 * s23;
  }
  for (int l = 0; l < kLanes; ++l) {
    out[4 * l + 0] = z0[l];
    out[4 * l + 1] = z1[l];
    out[4 * l + 2] = z2[l];
    out[4 * l + 3] = z3[l];
  }
}

}  // namespace

void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, float* out) {
  float staging[kBatch];
  int64_t e = first;
  const int64_t end = first + count;
  while (e < end) {
    const int64_t group = e / 4;
    const int64_t skip = e - 4 * group;  // only the first batch of an unaligned range skips
    const int64_t take = std::min<int64_t>(end - e, kBatch - skip);
    if (skip == 0 && take == kBatch) {
      normals_batch(seed, offset, static_cast<uint64_t>(group), out + (e - first));
    } else {
      normals_batch(seed, offset, static_cast<uint64_t>(group), staging);
      std::memcpy(out + (e - first), staging + skip, sizeof(float) * take);
    }
    e += take;
  }
}

}  // namespace fedlora
