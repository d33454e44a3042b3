// The AVX2 generator of the fedlora noise stream (common/philox.h), written with intrinsics: the
// auto-vectorised batch code leaves AVX2 CPUs well short of their bound.
#pragma once

#include <cstdint>

namespace fedlora {

// The 128 normals of Philox groups [group, group + 32) in stream order, bitwise those of the portable
// generator in normal_cpu.cpp (the same float operations in the same order, no fused multiply-adds).
// Call only where the CPU has AVX2.
void normals_batch_avx2(uint64_t seed, uint64_t offset, uint64_t group, float* out);

}  // namespace fedlora
