// Compile-only stand-in for cuBLAS's <cublas_v2.h>, which this CUDA toolkit lacks. Used only by the
// FEDLORA_CUDA_COMPILE_CHECK build (CPU torch); never linked. It declares just what torch's
// ATen/cuda/CUDAContextLight.h and ATen/cuda/Exceptions.h (TORCH_CUDABLAS_CHECK) name; fedlora code
// must not call cuBLAS through it.
#pragma once

typedef struct cublasContext* cublasHandle_t;

typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
