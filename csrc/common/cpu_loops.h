// Inner loops of the CPU kernels, built for AVX2 and AVX-512 besides the baseline ISA; every call takes
// the path common/cpu_path.h names: at the baseline's 128-bit SIMD these loops cannot keep up with the
// cache bandwidth the per-sample gradients stream at.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fedlora::loops {

// sum_c x[c]^2 in float32.
float sum_squares(const float* x, int64_t n);
float sum_squares(const c10::Half* x, int64_t n);
float sum_squares(const c10::BFloat16* x, int64_t n);

// acc[c] += w0 x0[c] + w1 x1[c] + w2 x2[c] + w3 x3[c]: four rows per sweep of the accumulator.
void axpy4(float* acc, const float* const x[4], const float w[4], int64_t n);
void axpy4(float* acc, const c10::Half* const x[4], const float w[4], int64_t n);
void axpy4(float* acc, const c10::BFloat16* const x[4], const float w[4], int64_t n);

// acc[c] += w x[c].
void axpy(float* acc, const float* x, float w, int64_t n);
void axpy(float* acc, const c10::Half* x, float w, int64_t n);
void axpy(float* acc, const c10::BFloat16* x, float w, int64_t n);

// acc[c] += w[c] x[c] (a weight per column).
void axpy_columns(float* acc, const float* x, const float* w, int64_t n);
void axpy_columns(float* acc, const c10::Half* x, const float* w, int64_t n);
void axpy_columns(float* acc, const c10::BFloat16* x, const float* w, int64_t n);

// x[c] = x[c] + s z[c], rounded to x's dtype.
void add_scaled(float* x, const float* z, float s, int64_t n);
void add_scaled(c10::Half* x, const float* z, float s, int64_t n);
void add_scaled(c10::BFloat16* x, const float* z, float s, int64_t n);

// out[c] = a[c], rounded to out's dtype.
void store(float* out, const float* a, int64_t n);
void store(c10::Half* out, const float* a, int64_t n);
void store(c10::BFloat16* out, const float* a, int64_t n);

// out[c] = a[c] s, rounded to out's dtype.
void store_scaled(float* out, const float* a, float s, int64_t n);
void store_scaled(c10::Half* out, const float* a, float s, int64_t n);
void store_scaled(c10::BFloat16* out, const float* a, float s, int64_t n);

// out[c] = (a[c] + t z[c]) s, rounded to out's dtype (each operation rounded in float32).
void store_noised_scaled(float* out, const float* a, const float* z, float t, float s, int64_t n);
void store_noised_scaled(c10::Half* out, const float* a, const float* z, float t, float s, int64_t n);
void store_noised_scaled(c10::BFloat16* out, const float* a, const float* z, float t, float s, int64_t n);

// out[i * out_stride + c] = s x[i * x_stride + c] for i < rows, c < cols, rounded to out's dtype: a
// scaled block copy (stacking LoRA factors), float32 or bfloat16 out.
void scale_rows(float* out, int64_t out_stride, const float* x, int64_t x_stride, float s, int64_t rows, int64_t cols);
void scale_rows(float* out, int64_t out_stride, const c10::Half* x, int64_t x_stride, float s, int64_t rows,
                int64_t cols);
void scale_rows(float* out, int64_t out_stride, const c10::BFloat16* x, int64_t x_stride, float s, int64_t rows,
                int64_t cols);
void scale_rows(c10::BFloat16* out, int64_t out_stride, const float* x, int64_t x_stride, float s, int64_t rows,
                int64_t cols);
void scale_rows(c10::BFloat16* out, int64_t out_stride, const c10::Half* x, int64_t x_stride, float s, int64_t rows,
                int64_t cols);
void scale_rows(c10::BFloat16* out, int64_t out_stride, const c10::BFloat16* x, int64_t x_stride, float s,
                int64_t rows, int64_t cols);

}  // namespace fedlora::loops
