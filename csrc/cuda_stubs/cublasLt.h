// Compile-only stand-in for cuBLASLt's <cublasLt.h>, which this CUDA toolkit lacks. Used only by the
// FEDLORA_CUDA_COMPILE_CHECK build (CPU torch); never linked. It declares just what torch's
// ATen/cuda/CUDAContextLight.h names.
#pragma once

typedef struct cublasLtContext* cublasLtHandle_t;
