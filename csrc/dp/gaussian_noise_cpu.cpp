// CPU kernel of gaussian_noise_: x += std * z over a list of tensors, z the fedlora noise stream
// (common/philox.h) indexed by the element's position in the flattened list. One parallel loop runs
// over the chunks of every tensor; the stream makes the result independent of the chunking.
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/cpu_loops.h"
#include "common/chunks.h"
#include "common/normal_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fedlora {
namespace {

constexpr int64_t kChunkWidth = 4096;  // elements per work item
// Normals drawn and added in pieces this long: x streams from memory while the generator computes,
// instead of in one burst per work item (the hardware prefetcher keeps up with a steady stream).
constexpr int64_t kPiece = 512;

void gaussian_noise_cpu(at::TensorList tensors, double std, int64_t seed, int64_t offset) {
  check_noise_targets(tensors, std, seed, offset);
  if (tensors.empty() || std == 0.0) return;

  // Work on contiguous buffers in the tensor's logical (row-major) element order; a strided tensor
  // gets a contiguous copy that is written back afterwards.
  std::vector<at::Tensor> buffers;
  std::vector<int64_t> widths;
  for (const at::Tensor& t : tensors) {
    buffers.push_back(t.contiguous());
    widths.push_back(t.numel());
  }
  const std::vector<Chunk> chunks = plan_chunks(widths, kChunkWidth);
  const std::vector<int64_t> starts = list_offsets(widths);
  const float scale = static_cast<float>(std);

  FEDLORA_DISPATCH_FLOATING(tensors[0].scalar_type(),
                                  "fedlora_gaussian_noise_", [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      float z[kPiece];
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        scalar_t* x = buffers[chunk.tensor].data_ptr<scalar_t>();
        const int64_t start = starts[chunk.tensor];  // the tensor's first stream position
        // Pieces end on multiples of kPiece in the stream, so only a work item's ends draw partial batches.
        for (int64_t e = start + chunk.begin; e < start + chunk.end;) {
          const int64_t len = std::min(start + chunk.end, (e / kPiece + 1) * kPiece) - e;
          fill_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), e, len, z);
          loops::add_scaled(x + (e - start), z, scale, len);
          e += len;
        }
      }
    });
  });
  for (size_t j = 0; j < tensors.size(); ++j) {
    if (!buffers[j].is_same(tensors[j])) tensors[j].copy_(buffers[j]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CPU, m) {
  m.impl("gaussian_noise_", &gaussian_noise_cpu);
}

}  // namespace fedlora
