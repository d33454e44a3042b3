// The one place that declares the fedlora operator schemas (a contract: see DESIGN.md, "Op contracts")
// and the pybind11 module `_C`, whose import runs this registration. Tensors travel through the
// dispatcher only; pybind11 carries plumbing such as build_info().
#include "common/cpu_path.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <torch/library.h>

TORCH_LIBRARY(fedlora, m) {
  m.def("per_sample_norms(Tensor[] per_sample_grads) -> Tensor");
  m.def("dp_clip_noise(Tensor[] per_sample_grads, float max_norm, float noise_multiplier, "
        "float denominator, int seed, int offset) -> (Tensor[], Tensor)");
  m.def("dp_clip_noise_with_sum(Tensor[] per_sample_grads, float max_norm, float noise_multiplier, "
        "float denominator, int seed, int offset) -> (Tensor[], Tensor[], Tensor)");
  m.def("gaussian_noise_(Tensor(a!)[] tensors, float std, int seed, int offset) -> ()");
  m.def("weighted_sum(Tensor[] xs, Tensor weights, int rank_dim, int out_rank) -> Tensor");
  m.def("stacked_delta(Tensor[] Bs, Tensor[] As, Tensor weights, float scale) -> Tensor");
  m.def("stacked_delta_(Tensor(a!) W, Tensor[] Bs, Tensor[] As, Tensor weights, float scale, "
        "bool transpose=False) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = FEDLORA_TORCH_VERSION;
#ifdef FEDLORA_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  pybind11::list archs;
  const std::string arch_string = FEDLORA_CUDA_ARCHS;
  size_t start = 0;
  while (start < arch_string.size()) {
    size_t end = arch_string.find(',', start);
    if (end == std::string::npos) end = arch_string.size();
    if (end > start) archs.append(arch_string.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["cpu_path"] = fedlora::cpu_path_name(fedlora::cpu_path());
  pybind11::list paths;
  for (const std::string& name : fedlora::supported_cpu_paths()) paths.append(name);
  info["cpu_paths"] = paths;
  return info;
}

// FEDLORA_CPU_PATH at import: a value this CPU cannot run warns and keeps the best path (an exception
// here would leave the package without its ops).
void cpu_path_from_environment() {
  const char* requested = std::getenv("FEDLORA_CPU_PATH");
  if (requested == nullptr || *requested == '\0') return;
  try {
    fedlora::set_cpu_path(requested);
  } catch (const c10::Error& error) {
    const std::string message = std::string("FEDLORA_CPU_PATH ignored: ") + error.what_without_backtrace() +
                                "; using " + fedlora::cpu_path_name(fedlora::cpu_path());
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) throw pybind11::error_already_set();
  }
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "fedlora_ext native library: importing it registers the torch.ops.fedlora operators";
  module.def("build_info", &build_info,
             "Torch version built against, CUDA kernels and architectures, OpenMP and its thread count, "
             "the CPU kernels' vector path and the paths this CPU supports");
  module.def("set_cpu_path",
             [](const std::string& name) {
               try {
                 fedlora::set_cpu_path(name);
               } catch (const c10::Error& error) {
                 throw pybind11::value_error(error.what_without_backtrace());
               }
             },
             "Vector path of the CPU kernels: 'auto' (the best this CPU supports), 'avx512', 'avx2' or "
             "'scalar'; raises ValueError for a path this CPU cannot run");
  cpu_path_from_environment();
}
