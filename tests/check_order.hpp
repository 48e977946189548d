// SPDX-License-Identifier: Apache-2.0
// The check pass's summation order (kernels/mixprec/cuda/grad_check.cuh),
// emulated on the host: the oracle the GPU tests compare its sums of
// squares with, bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mixprec/cuda/multi_tensor.cuh"

namespace mixprec::test {

// Lane 0 of a warp's shuffle-down tree (x += shfl_down(x, offset), offsets
// 16, 8, 4, 2, 1).
template <class V>
V shuffle_tree(std::vector<V> v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    for (int l = 0; l + offset < 32; ++l) v[l] = v[l] + v[l + offset];  // lane l reads l + offset before it changes
  }
  return v[0];
}

// One tensor's sum of squares in the order grad_check.cuh fixes for it. A
// work item is a slice of a chunk; each of the block's 256 threads keeps a
// float sum, fed by fused multiply-adds: on the vector path (per_vector
// elements per 16-byte load: 8 fp16/bf16, 4 fp32) thread t takes the loads
// t, t + 256, ... in order, then element j of the scalar tail goes to thread
// j % 256; on the scalar path (per_vector = 0: no loads, all tail) element j
// of the item goes to thread j % 256. The block adds each warp by the
// shuffle tree and the 8 warp sums in order; a tensor's item sums add up in
// double, in order with one slice per chunk, else strided over a warp's
// lanes and reduced by the same tree.
inline double emulate_sum_squares(const std::vector<float>& x, int slices, int per_vector) {
  const auto n = static_cast<std::int64_t>(x.size());
  std::vector<float> items;
  for (std::int64_t c0 = 0; c0 < n; c0 += cuda::chunk_elements) {
    const std::int64_t c1 = std::min(c0 + cuda::chunk_elements, n);
    const std::int64_t per_slice = ((c1 - c0 + slices - 1) / slices + 7) / 8 * 8;
    for (int s = 0; s < slices; ++s) {
      const std::int64_t begin = c0 + s * per_slice, end = std::min(begin + per_slice, c1);
      std::vector<float> thread(256, 0.0f);
      if (begin < end) {
        const std::int64_t vectors = per_vector > 0 ? (end - begin) / per_vector : 0;
        for (std::int64_t k = 0; k < vectors; ++k) {
          float& acc = thread[static_cast<std::size_t>(k % 256)];
          for (int j = 0; j < per_vector; ++j) {
            const float v = x[static_cast<std::size_t>(begin + per_vector * k + j)];
            acc = std::fmaf(v, v, acc);
          }
        }
        const std::int64_t tail = begin + vectors * (per_vector > 0 ? per_vector : 0);
        for (std::int64_t e = tail; e < end; ++e) {
          float& acc = thread[static_cast<std::size_t>((e - tail) % 256)];
          acc = std::fmaf(x[static_cast<std::size_t>(e)], x[static_cast<std::size_t>(e)], acc);
        }
      }
      float total = 0;
      for (int w = 0; w < 8; ++w) {
        total += shuffle_tree(std::vector<float>(thread.begin() + 32 * w, thread.begin() + 32 * w + 32));
      }
      items.push_back(total);
    }
  }
  if (slices == 1) {
    double s = 0;
    for (const float v : items) s += v;
    return s;
  }
  std::vector<double> lanes(32, 0.0);
  for (std::size_t c = 0; c < items.size(); ++c) lanes[c % 32] += items[c];
  return shuffle_tree(lanes);
}

}  // namespace mixprec::test
