#include "common/cpu_path.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace fedlora {
namespace {

CpuPath detect() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return CpuPath::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuPath::kAvx2;
#endif
  return CpuPath::kScalar;
}

bool detect_bf16_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const CpuPath kBest = detect();
const bool kBf16Dot = detect_bf16_dot();
std::atomic<int> current{static_cast<int>(kBest)};

}  // namespace

CpuPath cpu_path() { return static_cast<CpuPath>(current.load(std::memory_order_relaxed)); }

CpuPath best_cpu_path() { return kBest; }

bool cpu_path_has_bf16_dot() { return kBf16Dot && cpu_path() == CpuPath::kAvx512; }

const char* cpu_path_name(CpuPath path) {
  switch (path) {
    case CpuPath::kAvx512:
      return "avx512";
    case CpuPath::kAvx2:
      return "avx2";
    case CpuPath::kScalar:
      break;
  }
  return "scalar";
}

std::vector<std::string> supported_cpu_paths() {
  std::vector<std::string> names;
  for (int p = static_cast<int>(kBest); p >= 0; --p) names.emplace_back(cpu_path_name(static_cast<CpuPath>(p)));
  return names;
}

void set_cpu_path(const std::string& name) {
  if (name == "auto") {
    current.store(static_cast<int>(kBest), std::memory_order_relaxed);
    return;
  }
  std::string choices = "auto";
  for (const std::string& supported : supported_cpu_paths()) {
    choices += ", " + supported;
    if (name == supported) {
      const int p = name == "avx512" ? 2 : name == "avx2" ? 1 : 0;
      current.store(p, std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "fedlora: cpu path must be one of ", choices, " on this CPU, got '", name, "'");
}

}  // namespace fedlora
