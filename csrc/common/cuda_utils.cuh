// Launch plumbing shared by the CUDA kernels of dp/ and aggregate/: descriptor tables sent to the
// device in one copy, grid sizes for grid-stride loops, the lookup of an element's tensor in a
// flattened list, aligned vector loads and a deterministic block sum. Included by .cu files only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fedlora::cuda {

constexpr int kThreads = 256;              // threads per block of the element-wise kernels
constexpr int64_t kMaxBlocks = 1 << 20;    // grid-stride loops cover work beyond this many blocks

// Blocks for `items` work items of `per_block` each, at least 1 and at most kMaxBlocks.
inline unsigned int blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned int>(std::clamp<int64_t>((items + per_block - 1) / per_block, 1, kMaxBlocks));
}

// Tables of trivially copyable records (pointers, widths, chunk ranges) packed into one pinned host
// buffer and sent to the device with one non_blocking copy on the current stream:
//   DeviceTables tables;
//   const size_t at_descs = tables.add(descs);
//   const at::Tensor blob = tables.upload(device);   // keep in scope until the kernels are enqueued
//   const Desc* d = DeviceTables::get<Desc>(blob, at_descs);
// Lifetimes: the copy (copy_kernel_cuda) records an event on the pinned block, so the host caching
// allocator does not hand it out again before the copy has run, and the host buffer may be dropped at
// once. The device blob comes from the caching allocator on the current stream; a block freed there is
// reused only by work ordered after ours on that stream, so dropping the blob after the launches (all on
// the current stream) is safe without record_stream.
class DeviceTables {
 public:
  // Appends `records` and returns their byte offset in the blob (16-byte aligned).
  template <typename T>
  size_t add(const std::vector<T>& records) {
    static_assert(std::is_trivially_copyable_v<T>, "device table records are copied bytewise");
    const size_t offset = (bytes_.size() + kAlign - 1) / kAlign * kAlign;
    bytes_.resize(offset + records.size() * sizeof(T));
    if (!records.empty()) std::memcpy(bytes_.data() + offset, records.data(), records.size() * sizeof(T));
    return offset;
  }

  // One pinned staging buffer, one async host-to-device copy on the current stream of `device`.
  at::Tensor upload(const at::Device& device) const {
    const int64_t size = std::max<int64_t>(static_cast<int64_t>(bytes_.size()), 1);
    at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    if (!bytes_.empty()) std::memcpy(host.mutable_data_ptr(), bytes_.data(), bytes_.size());
    return host.to(device, at::kByte, /*non_blocking=*/true);
  }

  template <typename T>
  static const T* get(const at::Tensor& blob, size_t offset) {
    return reinterpret_cast<const T*>(static_cast<const uint8_t*>(blob.const_data_ptr()) + offset);
  }

 private:
  static constexpr size_t kAlign = 16;
  std::vector<uint8_t> bytes_;
};

// The tensor of a flattened list that holds element e: the largest j in [0, count) with
// descs[j].start <= e. Empty tensors share the start of the next one and are never returned for an
// e inside the list. Desc needs an int64_t `start`.
template <typename Desc>
__device__ __forceinline__ int64_t find_tensor(const Desc* descs, int64_t count, int64_t e) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (descs[mid].start <= e) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// N consecutive elements loaded or stored with one instruction (the address must be aligned to it).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// Sum of v over the block, valid in thread 0. The tree has a fixed shape for a given blockDim.x
// (a multiple of 32), so the result is the same on every run. Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  const unsigned int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int shift = 16; shift > 0; shift /= 2) v += __shfl_down_sync(0xffffffffu, v, shift);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int shift = 16; shift > 0; shift /= 2) v += __shfl_down_sync(0xffffffffu, v, shift);
  }
  __syncthreads();  // warp_sums is rewritten by the next call
  return v;
}

}  // namespace fedlora::cuda
