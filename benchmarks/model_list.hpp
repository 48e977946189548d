// SPDX-License-Identifier: Apache-2.0
// The tensor list every optimizer benchmark uses, so CPU, GPU and the
// PyTorch scripts (model_list.py) measure the same thing: 1M-element weights
// (2^20 - 1024) alternating with 1024-element biases, n elements in all.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mixprec::bench {

inline std::vector<std::int64_t> model_tensor_sizes(std::int64_t n) {
  std::vector<std::int64_t> sizes;
  for (std::int64_t left = n, k = 0; left > 0; ++k) {
    const std::int64_t size = std::min<std::int64_t>(left, k % 2 ? 1024 : (1 << 20) - 1024);
    sizes.push_back(size);
    left -= size;
  }
  return sizes;
}

}  // namespace mixprec::bench
