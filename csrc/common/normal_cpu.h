// Standard normals of the fedlora noise stream on the CPU (see common/philox.h).
#pragma once

#include <cstdint>

namespace fedlora {

// out[i] = z(seed, offset, first + i) for i in [0, count): the normals of stream elements
// [first, first + count). Independent of how a caller splits the range, so chunks may run in parallel.
void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, float* out);

}  // namespace fedlora
