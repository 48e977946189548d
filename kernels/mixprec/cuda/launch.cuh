// SPDX-License-Identifier: Apache-2.0
// Launch-configuration helpers shared by mixprec's kernels: grid sizing from
// the device's multiprocessor count.
#pragma once

#include <atomic>
#include <cstdint>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

/// Threads per block for mixprec's elementwise kernels.
inline constexpr int block_threads = 256;

/// Multiprocessor count of the current device, asked of the driver once per
/// device and cached: launchers call this on every launch.
inline int multiprocessor_count() {
  int device = 0;
  MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) {
    int count = 0;
    MIXPREC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    MIXPREC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);  // every thread stores the same value
  }
  return count;
}

/// Blocks for a grid-stride loop over `work_items` items of `per_block` each:
/// enough to fill every multiprocessor several times over, never more than
/// the work needs, at least one.
inline unsigned grid_for(std::int64_t work_items, int per_block = block_threads,
                         int blocks_per_sm = 8) {
  const std::int64_t needed = (work_items + per_block - 1) / per_block;
  const std::int64_t cap = static_cast<std::int64_t>(multiprocessor_count()) * blocks_per_sm;
  const std::int64_t blocks = needed < cap ? needed : cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace cuda
MIXPREC_NAMESPACE_END
