// CUDA side of the aggregate ops: weighted_sum, stacked_delta and stacked_delta_. For now a
// registration skeleton; with a CPU torch it is built only by the compile check
// (-DFEDLORA_CUDA_COMPILE_CHECK=ON, .ci/cuda_compile_check.sh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  // The CUDA kernels of weighted_sum, stacked_delta and stacked_delta_ come in the next issue.
}
