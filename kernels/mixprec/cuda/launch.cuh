// SPDX-License-Identifier: Apache-2.0
// Launch-configuration helpers shared by mixprec's kernels: grid sizing from
// the device's multiprocessor count.
#pragma once

#include <cstdint>

#include "mixprec/core/cuda_check.hpp"

namespace mixprec::cuda {

/// Threads per block for mixprec's elementwise kernels.
inline constexpr int block_threads = 256;

/// Multiprocessor count of the current device (an attribute query: cheap,
/// never synchronises).
inline int multiprocessor_count() {
  int device = 0;
  MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
  int count = 0;
  MIXPREC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
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

}  // namespace mixprec::cuda
