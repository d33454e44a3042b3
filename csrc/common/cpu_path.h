// The vector code path of the CPU kernels: AVX-512, AVX2 (+FMA) or scalar (the baseline ISA). By default
// the best one this CPU supports; FEDLORA_CPU_PATH=avx512|avx2|scalar|auto at import, or set_cpu_path()
// later, picks another one, so an AVX-512 machine also builds, tests and benchmarks the AVX2 and scalar
// code that other CPUs run. Every path gives bitwise the same results (DESIGN.md, "The noise stream").
#pragma once

#include <string>
#include <vector>

namespace fedlora {

enum class CpuPath : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The path the kernels take now (one relaxed atomic load: cheap enough for every inner-loop call).
CpuPath cpu_path();

// The best path this CPU supports.
CpuPath best_cpu_path();

// Whether the path may use the CPU's bfloat16 dot-product instructions (AVX512-BF16): the AVX-512 path
// on a CPU that has them. There a bfloat16 GEMM (oneDNN) runs ~2-3x faster than a float32 one.
bool cpu_path_has_bf16_dot();

// "avx512", "avx2" or "scalar".
const char* cpu_path_name(CpuPath path);

// The names of the paths this CPU can run, best first.
std::vector<std::string> supported_cpu_paths();

// Switches the path: "auto" (the best), or a name from supported_cpu_paths(). Anything else raises
// c10::ValueError naming the value and the choices.
void set_cpu_path(const std::string& name);

}  // namespace fedlora
