// Compile-only stand-in for cuSPARSE's <cusparse.h>, which this CUDA toolkit lacks. Used only by the
// FEDLORA_CUDA_COMPILE_CHECK build (CPU torch); never linked. It declares just what torch's
// ATen/cuda/CUDAContextLight.h and ATen/cuda/Exceptions.h (TORCH_CUDASPARSE_CHECK) name.
#pragma once

typedef struct cusparseContext* cusparseHandle_t;

typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;

#ifdef __cplusplus
extern "C" {
#endif
const char* cusparseGetErrorString(cusparseStatus_t status);
#ifdef __cplusplus
}
#endif
