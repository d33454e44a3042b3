// Compile-only stand-in for cuSOLVER's <cusolverDn.h>, which this CUDA toolkit lacks. Used only by
// the FEDLORA_CUDA_COMPILE_CHECK build (CPU torch); never linked. It declares just what torch's
// ATen/cuda/CUDAContextLight.h names.
#pragma once

#include "cusolver_common.h"

typedef struct cusolverDnContext* cusolverDnHandle_t;
