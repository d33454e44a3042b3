#include "common/cpu_loops.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FEDLORA_MULTIVERSION __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define FEDLORA_MULTIVERSION
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

}  // namespace

#define FEDLORA_LOOPS_FOR(T)                                                                          \
  FEDLORA_MULTIVERSION float sum_squares(const T* x, int64_t n) { return sum_squares_impl(x, n); }  \
  FEDLORA_MULTIVERSION void axpy4(float* acc, const T* const x[4], const float w[4], int64_t n) {    \
    axpy4_impl(acc, x, w, n);                                                                         \
  }                                                                                                   \
  FEDLORA_MULTIVERSION void axpy(float* acc, const T* x, float w, int64_t n) { axpy_impl(acc, x, w, n); } \
  FEDLORA_MULTIVERSION void axpy_columns(float* acc, const T* x, const float* w, int64_t n) {        \
    axpy_columns_impl(acc, x, w, n);                                                                  \
  }                                                                                                   \
  FEDLORA_MULTIVERSION void add_scaled(T* x, const float* z, float s, int64_t n) { add_scaled_impl(x, z, s, n); }

FEDLORA_LOOPS_FOR(float)
FEDLORA_LOOPS_FOR(c10::Half)
FEDLORA_LOOPS_FOR(c10::BFloat16)

}  // namespace fedlora::loops
