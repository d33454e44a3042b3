// Eight Philox groups per __m256i: Philox4x32-10, uniforms, Box-Muller (log and sincos polynomials of
// normal_cpu.cpp, operation for operation) and a 4 x 8 transpose into stream order, all in registers.
#include "common/normal_avx2.h"

#include "common/philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define FEDLORA_AVX2 __attribute__((target("avx2"), always_inline)) inline

namespace fedlora {
namespace {

FEDLORA_AVX2 __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
FEDLORA_AVX2 __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
FEDLORA_AVX2 __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
FEDLORA_AVX2 __m256 splat(float v) { return _mm256_set1_ps(v); }

// Uniform in (0, 1]: ((bits >> 8) + 1) * 2^-24.
FEDLORA_AVX2 __m256 uniform(__m256i bits) {
  const __m256i top = _mm256_add_epi32(_mm256_srli_epi32(bits, 8), _mm256_set1_epi32(1));
  return mul(_mm256_cvtepi32_ps(top), splat(1.0f / 16777216.0f));
}

// log_unit of normal_cpu.cpp.
FEDLORA_AVX2 __m256 log_unit(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
  const __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  const __m256 low = _mm256_cmp_ps(m, splat(0.70710678118654752f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(low));  // e - 1 where low (the mask is -1)
  const __m256 x = sub(mul(m, _mm256_blendv_ps(splat(1.0f), splat(2.0f), low)), splat(1.0f));
  const __m256 z = mul(x, x);
  __m256 y = splat(7.0376836292e-2f);
  y = sub(mul(y, x), splat(1.1514610310e-1f));
  y = add(mul(y, x), splat(1.1676998740e-1f));
  y = sub(mul(y, x), splat(1.2420140846e-1f));
  y = add(mul(y, x), splat(1.4249322787e-1f));
  y = sub(mul(y, x), splat(1.6668057665e-1f));
  y = add(mul(y, x), splat(2.0000714765e-1f));
  y = sub(mul(y, x), splat(2.4999993993e-1f));
  y = add(mul(y, x), splat(3.3333331174e-1f));
  y = mul(mul(y, x), z);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = add(y, mul(splat(-2.12194440e-4f), fe));
  y = add(y, mul(splat(-0.5f), z));
  return add(add(x, y), mul(splat(0.693359375f), fe));
}

// sincos_2pi of normal_cpu.cpp.
FEDLORA_AVX2 void sincos_2pi(__m256 u, __m256& s, __m256& c) {
  const __m256i qi = _mm256_cvttps_epi32(add(mul(u, splat(4.0f)), splat(0.5f)));
  const __m256 q = _mm256_cvtepi32_ps(qi);
  const __m256 a = mul(sub(u, mul(q, splat(0.25f))), splat(6.28318530717958648f));
  const __m256 a2 = mul(a, a);
  __m256 ps = add(splat(8.3321608736e-3f), mul(a2, splat(-1.9515295891e-4f)));
  ps = add(splat(-1.6666654611e-1f), mul(a2, ps));
  const __m256 sp = add(a, mul(mul(a, a2), ps));
  __m256 pc = add(splat(-1.388731625493765e-3f), mul(a2, splat(2.443315711809948e-5f)));
  pc = add(splat(4.166664568298827e-2f), mul(a2, pc));
  const __m256 cp = add(sub(splat(1.0f), mul(splat(0.5f), a2)), mul(mul(a2, a2), pc));
  const __m256i quadrant = _mm256_and_si256(qi, _mm256_set1_epi32(3));
  const __m256 swap = _mm256_castsi256_ps(_mm256_sub_epi32(
      _mm256_setzero_si256(), _mm256_and_si256(quadrant, _mm256_set1_epi32(1))));
  const __m256 cs = _mm256_blendv_ps(cp, sp, swap);
  const __m256 sn = _mm256_blendv_ps(sp, cp, swap);
  const __m256i two = _mm256_set1_epi32(2);
  const __m256i c_sign = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(quadrant, _mm256_set1_epi32(1)), two), 30);
  const __m256i s_sign = _mm256_slli_epi32(_mm256_and_si256(quadrant, two), 30);
  c = _mm256_xor_ps(cs, _mm256_castsi256_ps(c_sign));
  s = _mm256_xor_ps(sn, _mm256_castsi256_ps(s_sign));
}

// hi and lo 32-bit halves of a * x for every lane (vpmuludq on the even and the odd lanes).
FEDLORA_AVX2 void mulhilo(__m256i x, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Counters of groups g = first + lane: (lo32(g), hi32(g)); hi32 carries by one where lo32 wrapped.
FEDLORA_AVX2 void counters(uint64_t first, __m256i& lo, __m256i& hi) {
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  lo = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);  // unsigned compare: lo < base where it wrapped
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(lo, sign));
  hi = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32))), wrapped);
}

// Box-Muller on one vector of Philox words, stored in stream order: out[4l + t] = z_t[l].
FEDLORA_AVX2 void box_muller_store(__m256i x0, __m256i x1, __m256i x2, __m256i x3, float* out) {
  const __m256 r01 = _mm256_sqrt_ps(mul(splat(-2.0f), log_unit(uniform(x0))));
  const __m256 r23 = _mm256_sqrt_ps(mul(splat(-2.0f), log_unit(uniform(x2))));
  __m256 s01, c01, s23, c23;
  sincos_2pi(uniform(x1), s01, c01);
  sincos_2pi(uniform(x3), s23, c23);
  const __m256 z0 = mul(r01, c01), z1 = mul(r01, s01), z2 = mul(r23, c23), z3 = mul(r23, s23);
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1), t1 = _mm256_unpackhi_ps(z0, z1);
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3), t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 l04 = _mm256_shuffle_ps(t0, t2, 0x44), l15 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 l26 = _mm256_shuffle_ps(t1, t3, 0x44), l37 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(l04, l15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(l26, l37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(l04, l15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(l26, l37, 0x31));
}

}  // namespace

__attribute__((target("avx2"))) void normals_batch_avx2(uint64_t seed, uint64_t offset, uint64_t group,
                                                         float* out) {
  // The round keys, the same for every lane and vector: computed once per batch.
  alignas(32) __m256i key0[philox::kRounds], key1[philox::kRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    key0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    key1[r] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += philox::kRoundA;
    k1 += philox::kRoundB;
  }
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(philox::kMulA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(philox::kMulB));
  const __m256i off_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i off_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  // Two vectors (16 groups) per pass: two independent multiply chains keep the ports busy.
  for (int v = 0; v < 4; v += 2, out += 64) {
    __m256i a0, a1, b0, b1;
    counters(group + 8 * static_cast<uint64_t>(v), a0, a1);
    counters(group + 8 * static_cast<uint64_t>(v + 1), b0, b1);
    __m256i a2 = off_lo, a3 = off_hi, b2 = off_lo, b3 = off_hi;
    _Pragma("GCC unroll 10") for (int r = 0; r < philox::kRounds; ++r) {
      __m256i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
      mulhilo(a0, mul_a, ahi0, alo0);
      mulhilo(b0, mul_a, bhi0, blo0);
      mulhilo(a2, mul_b, ahi1, alo1);
      mulhilo(b2, mul_b, bhi1, blo1);
      a0 = _mm256_xor_si256(_mm256_xor_si256(ahi1, a1), key0[r]);
      b0 = _mm256_xor_si256(_mm256_xor_si256(bhi1, b1), key0[r]);
      a2 = _mm256_xor_si256(_mm256_xor_si256(ahi0, a3), key1[r]);
      b2 = _mm256_xor_si256(_mm256_xor_si256(bhi0, b3), key1[r]);
      a1 = alo1;
      b1 = blo1;
      a3 = alo0;
      b3 = blo0;
    }
    box_muller_store(a0, a1, a2, a3, out);
    box_muller_store(b0, b1, b2, b3, out + 32);
  }
}

}  // namespace fedlora

#endif
