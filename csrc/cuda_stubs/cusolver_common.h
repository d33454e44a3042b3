// Compile-only stand-in for cuSOLVER's <cusolver_common.h>, which this CUDA toolkit lacks. Used only
// by the FEDLORA_CUDA_COMPILE_CHECK build (CPU torch); never linked. It declares just what torch's
// ATen/cuda/Exceptions.h (including TORCH_CUSOLVER_CHECK) names.
#pragma once

typedef enum {
  CUSOLVER_STATUS_SUCCESS = 0,
  CUSOLVER_STATUS_INVALID_VALUE = 3,
} cusolverStatus_t;
