// CPU kernel of weighted_sum: out = sum_k w_k * zero_pad(x_k, out_rank) along rank_dim (FedAvg,
// HetLoRA's zero-padding, LoRA-A2's per-rank masks as [K, out_rank] weights).
//
// View x_k as [outer, r_k * inner] rows and out as [outer, R * inner] rows: zero-padding at the end of
// rank_dim means the r_k * inner columns of a row of x_k are the first columns of the same row of out.
// One parallel loop over output tiles; each tile accumulates all K clients in float32 while it is in
// cache, reading every client row once.
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/cpu_loops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fedlora {
namespace {

constexpr int64_t kTileColumns = 2048;
constexpr int64_t kTileElements = 8192;  // float32 accumulator of one tile: 32 KiB

at::Tensor weighted_sum_cpu(at::TensorList xs, const at::Tensor& weights, int64_t rank_dim,
                            int64_t out_rank) {
  const WeightedSumLayout layout = check_weighted_sum(xs, weights, rank_dim, out_rank);
  const at::ScalarType dtype = xs[0].scalar_type();
  at::Tensor out = at::empty(layout.out_sizes, xs[0].options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t rows = layout.outer;
  const int64_t width = out_rank * layout.inner;  // columns of an output row
  if (out.numel() == 0) return out;

  std::vector<at::Tensor> clients;
  std::vector<int64_t> client_width;  // r_k * inner
  for (const at::Tensor& x : xs) {
    clients.push_back(x.contiguous());
    client_width.push_back(x.size(layout.rank_dim) * layout.inner);
  }
  const at::Tensor w = weights.contiguous();
  const float* wp = w.const_data_ptr<float>();
  const int64_t inner = layout.inner;
  const bool per_rank = layout.per_rank_weights;

  const int64_t tile_cols = std::min(width, kTileColumns);
  const int64_t tile_rows = std::max<int64_t>(1, kTileElements / tile_cols);
  const int64_t col_tiles = (width + tile_cols - 1) / tile_cols;
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows;

  FEDLORA_DISPATCH_FLOATING(dtype, "fedlora_weighted_sum", [&] {
    // acc [r1 - r0, c1 - c0] += weight * x_k over the tile, for one client (any rank, any weights).
    auto accumulate_client = [&](int64_t k, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* acc,
                                 float* wrow) {
      const int64_t ck = std::min(c1, client_width[k]);  // columns past r_k * inner are padding
      const int64_t tw = c1 - c0;
      // The padding holds zeros: w * 0 adds nothing unless w is NaN or infinite, and then the twin's
      // NaN must show there too (a bad weight must not vanish from the padded ranks).
      for (int64_t c = std::max(c0, ck); c < c1;) {  // one check per run of columns sharing a weight
        const int64_t rank = per_rank ? c / inner : 0;
        const int64_t run_end = per_rank ? std::min(c1, (rank + 1) * inner) : c1;
        const float wc = per_rank ? wp[k * out_rank + rank] : wp[k];
        if (!std::isfinite(wc)) {
          for (int64_t r = r0; r < r1; ++r) {
            for (int64_t cc = c; cc < run_end; ++cc) acc[(r - r0) * tw + (cc - c0)] += wc * 0.0f;
          }
        }
        c = run_end;
      }
      if (ck <= c0) return;
      const int64_t len = ck - c0;
      // The weight of every column in the tile: w[k] or w[k, rank of the column].
      if (per_rank) {
        for (int64_t c = c0; c < ck;) {
          const int64_t rank = c / inner, run_end = std::min(ck, (rank + 1) * inner);
          std::fill(wrow + (c - c0), wrow + (run_end - c0), wp[k * out_rank + rank]);
          c = run_end;
        }
      } else {
        std::fill(wrow, wrow + len, wp[k]);
      }
      const scalar_t* x = clients[k].const_data_ptr<scalar_t>();
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = x + r * client_width[k] + c0;
        float* ar = acc + (r - r0) * tw;
        loops::axpy_columns(ar, xr, wrow, len);
      }
    };
    at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(static_cast<size_t>(tile_rows * tile_cols));
      std::vector<float> wrow(static_cast<size_t>(tile_cols));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = (t / col_tiles) * tile_rows, r1 = std::min(rows, r0 + tile_rows);
        const int64_t c0 = (t % col_tiles) * tile_cols, c1 = std::min(width, c0 + tile_cols);
        const int64_t tw = c1 - c0;
        std::fill(acc.begin(), acc.end(), 0.0f);
        // FedAvg's common case: full-rank clients under [K] weights, where the tile is one contiguous
        // run in every x_k and in acc. Four clients per sweep quarter the accumulator traffic.
        const bool flat = !per_rank && tw == width;
        const int64_t run = (r1 - r0) * width;
        float* at = acc.data();
        int64_t k = 0;
        while (k < K) {
          if (flat && k + 4 <= K && client_width[k] == width && client_width[k + 1] == width &&
              client_width[k + 2] == width && client_width[k + 3] == width) {
            const scalar_t* rows[4] = {clients[k].const_data_ptr<scalar_t>() + r0 * width,
                                       clients[k + 1].const_data_ptr<scalar_t>() + r0 * width,
                                       clients[k + 2].const_data_ptr<scalar_t>() + r0 * width,
                                       clients[k + 3].const_data_ptr<scalar_t>() + r0 * width};
            loops::axpy4(at, rows, wp + k, run);
            k += 4;
            continue;
          }
          accumulate_client(k, r0, r1, c0, c1, acc.data(), wrow.data());
          ++k;
        }
        scalar_t* o = out.data_ptr<scalar_t>();
        for (int64_t r = r0; r < r1; ++r) {
          const float* ar = acc.data() + (r - r0) * tw;
          scalar_t* orow = o + r * width + c0;
          for (int64_t c = 0; c < tw; ++c) orow[c] = static_cast<scalar_t>(ar[c]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedlora, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
}

}  // namespace fedlora
