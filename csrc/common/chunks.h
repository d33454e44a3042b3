// Multi-tensor work lists: every tensor of a call is cut into column ranges, and one parallel loop runs
// over all ranges of all tensors, instead of one loop (or one ATen call) per tensor.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fedlora {

struct Chunk {
  int64_t tensor;  // index into the call's tensor list
  int64_t begin;   // first column (element of the flattened per-sample or whole tensor)
  int64_t end;     // one past the last column
};

// Cuts columns [0, widths[j]) of every tensor j into ranges of at most `max_width`.
inline std::vector<Chunk> plan_chunks(const std::vector<int64_t>& widths, int64_t max_width) {
  std::vector<Chunk> chunks;
  for (int64_t j = 0; j < static_cast<int64_t>(widths.size()); ++j) {
    for (int64_t b = 0; b < widths[j]; b += max_width) {
      chunks.push_back({j, b, std::min(widths[j], b + max_width)});
    }
  }
  return chunks;
}

// Element e of tensor j is element starts[j] + e of the call's flattened list (the noise stream index).
inline std::vector<int64_t> list_offsets(const std::vector<int64_t>& widths) {
  std::vector<int64_t> starts(widths.size(), 0);
  for (size_t j = 1; j < widths.size(); ++j) starts[j] = starts[j - 1] + widths[j - 1];
  return starts;
}

}  // namespace fedlora
