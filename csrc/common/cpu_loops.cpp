#include "common/cpu_loops.h"

#include "common/cpu_path.h"

#include <bit>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define FEDLORA_X86_PATHS 1
#define FEDLORA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FEDLORA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#else
#define FEDLORA_X86_PATHS 0
#endif
#define FEDLORA_INLINE inline __attribute__((always_inline))

namespace fedlora::loops {
namespace {

constexpr int kLanes = 16;  // independent accumulators, so the reduction vectorises

template <typename T>
FEDLORA_INLINE float sum_squares_impl(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = static_cast<float>(x[c + l]);
      acc[l] += v * v;
    }
  }
  float tail = 0.0f;
  for (; c < n; ++c) {
    const float v = static_cast<float>(x[c]);
    tail += v * v;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0] + tail;
}

template <typename T>
FEDLORA_INLINE void axpy4_impl(float* __restrict acc, const T* const x[4], const float w[4], int64_t n) {
  const T* __restrict x0 = x[0];
  const T* __restrict x1 = x[1];
  const T* __restrict x2 = x[2];
  const T* __restrict x3 = x[3];
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w0 * static_cast<float>(x0[c]) + w1 * static_cast<float>(x1[c]) +
              w2 * static_cast<float>(x2[c]) + w3 * static_cast<float>(x3[c]);
  }
}

template <typename T>
FEDLORA_INLINE void axpy_impl(float* __restrict acc, const T* __restrict x, float w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += w * static_cast<float>(x[c]);
}

template <typename T>
FEDLORA_INLINE void axpy_columns_impl(float* __restrict acc, const T* __restrict x, const float* __restrict w,
                                      int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += w[c] * static_cast<float>(x[c]);
}

template <typename T>
FEDLORA_INLINE void add_scaled_impl(T* __restrict x, const float* __restrict z, float s, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] = static_cast<T>(static_cast<float>(x[c]) + s * z[c]);
}

template <typename T>
FEDLORA_INLINE void store_impl(T* __restrict out, const float* __restrict a, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(a[c]);
}

template <typename T>
FEDLORA_INLINE void store_scaled_impl(T* __restrict out, const float* __restrict a, float s, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(a[c] * s);
}

template <typename T>
FEDLORA_INLINE void store_noised_scaled_impl(T* __restrict out, const float* __restrict a, const float* __restrict z,
                                             float t, float s, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>((a[c] + t * z[c]) * s);
}

// float -> O as c10 rounds it (bfloat16: to nearest even, NaN to the quiet NaN), written branch-free so
// the loops over it vectorise (c10's bfloat16 constructor branches per element).
template <typename O>
FEDLORA_INLINE O round_to(float v) {
  if constexpr (std::is_same_v<O, c10::BFloat16>) {
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const uint16_t rounded = static_cast<uint16_t>((bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16);
    return c10::BFloat16(v != v ? uint16_t{0x7FC0} : rounded, c10::BFloat16::from_bits());
  } else {
    return static_cast<O>(v);
  }
}

template <typename O, typename T, int kCols>  // kCols > 0: a width known here, so a row is a few vector ops
FEDLORA_INLINE void scale_rows_of(O* __restrict out, int64_t out_stride, const T* __restrict x, int64_t x_stride,
                                  float s, int64_t rows, int64_t cols) {
  const int64_t width = kCols > 0 ? kCols : cols;
  for (int64_t i = 0; i < rows; ++i, out += out_stride, x += x_stride) {
    for (int64_t c = 0; c < width; ++c) out[c] = round_to<O>(s * static_cast<float>(x[c]));
  }
}

// LoRA ranks are mostly 4 to 32: rows that narrow are too short for a vectorised loop of unknown length.
template <typename O, typename T>
FEDLORA_INLINE void scale_rows_impl(O* out, int64_t out_stride, const T* x, int64_t x_stride, float s, int64_t rows,
                                    int64_t cols) {
  switch (cols) {
    case 8:
      return scale_rows_of<O, T, 8>(out, out_stride, x, x_stride, s, rows, cols);
    case 16:
      return scale_rows_of<O, T, 16>(out, out_stride, x, x_stride, s, rows, cols);
    case 32:
      return scale_rows_of<O, T, 32>(out, out_stride, x, x_stride, s, rows, cols);
    default:
      return scale_rows_of<O, T, 0>(out, out_stride, x, x_stride, s, rows, cols);
  }
}

}  // namespace

// Each loop three times, compiled for the baseline ISA, AVX2+FMA and AVX-512 (this file is built with
// -ffp-contract=off, so no path fuses a multiply-add the others round twice: bitwise equal results), and
// a public entry that calls the one cpu_path() names.
#if FEDLORA_X86_PATHS
#define FEDLORA_ON_PATH(NAME, ARGS)                              \
  switch (cpu_path()) {                                          \
    case CpuPath::kAvx512:                                       \
      return NAME##_avx512 ARGS;                                 \
    case CpuPath::kAvx2:                                         \
      return NAME##_avx2 ARGS;                                   \
    case CpuPath::kScalar:                                       \
      break;                                                     \
  }                                                              \
  return NAME##_impl ARGS;
#define FEDLORA_VERSIONS(RET, NAME, PARAMS, ARGS)                                    \
  namespace {                                                                        \
  FEDLORA_TARGET_AVX2 RET NAME##_avx2 PARAMS { return NAME##_impl ARGS; }            \
  FEDLORA_TARGET_AVX512 RET NAME##_avx512 PARAMS { return NAME##_impl ARGS; }        \
  }                                                                                  \
  RET NAME PARAMS { FEDLORA_ON_PATH(NAME, ARGS) }
#else
#define FEDLORA_VERSIONS(RET, NAME, PARAMS, ARGS) \
  RET NAME PARAMS { return NAME##_impl ARGS; }
#endif

#define FEDLORA_LOOPS_FOR(T)                                                                                  \
  FEDLORA_VERSIONS(float, sum_squares, (const T* x, int64_t n), (x, n))                                       \
  FEDLORA_VERSIONS(void, axpy4, (float* acc, const T* const x[4], const float w[4], int64_t n), (acc, x, w, n)) \
  FEDLORA_VERSIONS(void, axpy, (float* acc, const T* x, float w, int64_t n), (acc, x, w, n))                  \
  FEDLORA_VERSIONS(void, axpy_columns, (float* acc, const T* x, const float* w, int64_t n), (acc, x, w, n))   \
  FEDLORA_VERSIONS(void, add_scaled, (T* x, const float* z, float s, int64_t n), (x, z, s, n))              \
  FEDLORA_VERSIONS(void, store, (T* out, const float* a, int64_t n), (out, a, n))                              \
  FEDLORA_VERSIONS(void, store_scaled, (T* out, const float* a, float s, int64_t n), (out, a, s, n))           \
  FEDLORA_VERSIONS(void, store_noised_scaled, (T* out, const float* a, const float* z, float t, float s, int64_t n), \
                   (out, a, z, t, s, n))                                                                       \
  FEDLORA_VERSIONS(void, scale_rows,                                                                          \
                   (float* out, int64_t os, const T* x, int64_t xs, float s, int64_t rows, int64_t cols),   \
                   (out, os, x, xs, s, rows, cols))                                                           \
  FEDLORA_VERSIONS(void, scale_rows,                                                                          \
                   (c10::BFloat16* out, int64_t os, const T* x, int64_t xs, float s, int64_t rows, int64_t cols), \
                   (out, os, x, xs, s, rows, cols))

FEDLORA_LOOPS_FOR(float)
FEDLORA_LOOPS_FOR(c10::Half)
FEDLORA_LOOPS_FOR(c10::BFloat16)

}  // namespace fedlora::loops
