// The one place that declares the fedlora operator schemas (a contract: see DESIGN.md, "Op contracts")
// and the pybind11 module `_C`, whose import runs this registration. Tensors travel through the
// dispatcher only; pybind11 carries plumbing such as build_info().
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fedlora, m) {
  m.def("per_sample_norms(Tensor[] per_sample_grads) -> Tensor");
  m.def("dp_clip_noise(Tensor[] per_sample_grads, float max_norm, float noise_multiplier, "
        "float denominator, int seed, int offset) -> (Tensor[], Tensor)");
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
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "fedlora_ext native library: importing it registers the torch.ops.fedlora operators";
  module.def("build_info", &build_info,
             "Torch version built against, CUDA kernels and architectures, OpenMP and its thread count");
}
