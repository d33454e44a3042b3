#include "common/normal_cpu.h"

#include "common/cpu_path.h"
#include "common/normal_avx2.h"
#include "common/philox.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

// The batch generator is compute-bound: on x86 it is also built for AVX-512 here and for AVX2 with
// intrinsics (normal_avx2.cpp), and every call takes the path cpu_path() names. These files are built
// with -ffp-contract=off: no path fuses a multiply-add that another rounds twice, so all of them give
// bitwise the same stream.
#if defined(__x86_64__) && defined(__GNUC__)
#define FEDLORA_X86_DISPATCH 1
#include <immintrin.h>
#else
#define FEDLORA_X86_DISPATCH 0
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

// Philox words of groups [group, group + kLanes), one lane per group: the portable version.
FEDLORA_INLINE void philox_lanes(uint64_t seed, uint64_t offset, uint64_t group, uint32_t* c0,
                                 uint32_t* c1, uint32_t* c2, uint32_t* c3) {
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t g = group + static_cast<uint64_t>(l);
    uint32_t x0 = static_cast<uint32_t>(g), x1 = static_cast<uint32_t>(g >> 32);
    uint32_t x2 = static_cast<uint32_t>(offset), x3 = static_cast<uint32_t>(offset >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
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
}

// Box-Muller on the words of kLanes groups, written in stream order. Straight-line per lane, so the
// compiler vectorises it for whatever target the caller is built for.
FEDLORA_INLINE void box_muller_lanes(const uint32_t* c0, const uint32_t* c1, const uint32_t* c2,
                                     const uint32_t* c3, float* out) {
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

// Lane counters of groups [group, group + kLanes): (lo32(g), hi32(g)).
FEDLORA_INLINE void group_counters(uint64_t group, uint32_t* lo, uint32_t* hi) {
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t g = group + static_cast<uint64_t>(l);
    lo[l] = static_cast<uint32_t>(g);
    hi[l] = static_cast<uint32_t>(g >> 32);
  }
}

void normals_batch_portable(uint64_t seed, uint64_t offset, uint64_t group, float* out) {
  alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  philox_lanes(seed, offset, group, c0, c1, c2, c3);
  box_muller_lanes(c0, c1, c2, c3, out);
}

#if FEDLORA_X86_DISPATCH
#define FEDLORA_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// hi and lo 32-bit halves of a * x for every lane: vpmuludq on the even and the odd lanes, then one
// masked pair swap each (lanes 2k + 1 of lo come from the odd products, lanes 2k of hi from the even).
FEDLORA_AVX512 void mulhilo_512(__m512i x, __m512i a, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, a);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
}

FEDLORA_AVX512 __m512i xor3(__m512i a, __m512i b, __m512i c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }

// Philox words of kLanes groups, 16 per vector, both vectors' rounds interleaved (two independent
// multiply chains), then the compiler-vectorised Box-Muller.
__attribute__((target("avx512f"))) void normals_batch_512(uint64_t seed, uint64_t offset, uint64_t group,
                                                         float* out) {
  static_assert(kLanes == 32, "two vectors of 16 groups");
  alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  group_counters(group, c0, c1);
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(philox::kMulA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(philox::kMulB));
  __m512i a0 = _mm512_load_si512(c0), a1 = _mm512_load_si512(c1);
  __m512i b0 = _mm512_load_si512(c0 + 16), b1 = _mm512_load_si512(c1 + 16);
  __m512i a2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m512i a3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  __m512i b2 = a2, b3 = a3;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  _Pragma("GCC unroll 10") for (int r = 0; r < philox::kRounds; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    __m512i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
    mulhilo_512(a0, mul_a, ahi0, alo0);
    mulhilo_512(b0, mul_a, bhi0, blo0);
    mulhilo_512(a2, mul_b, ahi1, alo1);
    mulhilo_512(b2, mul_b, bhi1, blo1);
    a0 = xor3(ahi1, a1, key0);
    b0 = xor3(bhi1, b1, key0);
    a2 = xor3(ahi0, a3, key1);
    b2 = xor3(bhi0, b3, key1);
    a1 = alo1;
    b1 = blo1;
    a3 = alo0;
    b3 = blo0;
    k0 += philox::kRoundA;
    k1 += philox::kRoundB;
  }
  _mm512_store_si512(c0, a0), _mm512_store_si512(c1, a1), _mm512_store_si512(c2, a2), _mm512_store_si512(c3, a3);
  _mm512_store_si512(c0 + 16, b0), _mm512_store_si512(c1 + 16, b1);
  _mm512_store_si512(c2 + 16, b2), _mm512_store_si512(c3 + 16, b3);
  box_muller_lanes(c0, c1, c2, c3, out);
}
#endif

using BatchFn = void (*)(uint64_t, uint64_t, uint64_t, float*);

// The generator of the path cpu_path() names.
BatchFn batch_fn() {
#if FEDLORA_X86_DISPATCH
  switch (cpu_path()) {
    case CpuPath::kAvx512:
      return normals_batch_512;
    case CpuPath::kAvx2:
      return normals_batch_avx2;  // hand-vectorised: normal_avx2.cpp
    case CpuPath::kScalar:
      break;
  }
#endif
  return normals_batch_portable;
}

}  // namespace

void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, float* out) {
  const BatchFn normals_batch = batch_fn();
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
