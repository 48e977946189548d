// SPDX-License-Identifier: Apache-2.0
// Pass 1 of a mixed-precision step on the GPU: one launch reads every
// gradient of a TensorList once, finds inf/NaN per tensor, and sums squares
// per tensor and overall. Writes nothing but its results.
#pragma once

#include <cstdint>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/cuda/multi_tensor.cuh"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

namespace detail {

inline constexpr int check_threads = 256;
inline constexpr int check_unroll = 4;  // 16-byte loads a thread has in flight (accumulate_range)

inline constexpr int histogram_bins = 64;  // monitor::Bins

// The bin of x in monitor::Bins: 0 zero, 63 inf/NaN, else
// clamp(floor(log2|x|), -45, 16) + 46 (float subnormals are all below 2^-45).
__device__ inline int exponent_bin(float x) {
  const unsigned bits = __float_as_uint(x) & 0x7fffffffu;
  if (bits == 0) return 0;
  const int biased = static_cast<int>(bits >> 23);
  if (biased == 0xff) return histogram_bins - 1;
  return min(max(biased - 127, -45), 16) + 46;
}

// One element widened to float: its square into `sum`, non-finite into
// `bad`, and with a histogram (per warp, shared memory) its exponent bin.
template <bool Hist, class T>
__device__ inline void accumulate_one(T value, float& sum, int& bad, unsigned* hist) {
  const float x = mixprec::to_float(value);
  // One fused multiply-add, written out: the order and rounding of the sum
  // (hence the norm's bits) do not depend on nvcc's contraction flags.
  sum = __fmaf_rn(x, x, sum);
  bad |= !isfinite(x);
  // One shared atomic a lane. Lanes whose values share a bin serialise on
  // it, and that is still cheaper than grouping them first: on an H200, 2.1M
  // fp16 gradients cost the pass 1.2 us more with this, 4.4 us more with
  // __match_any_sync and one add per group (benchmarks/histogram_binning.cu,
  // 2026-12-06; docs/monitor.md).
  if constexpr (Hist) atomicAdd(hist + exponent_bin(x), 1u);
}

// The elements of one 16-byte load, in order.
template <bool Hist, class T>
__device__ inline void accumulate_vector(const uint4& raw, float& sum, int& bad, unsigned* hist) {
  constexpr int per_vector = 16 / sizeof(T);
  T items[per_vector];
  memcpy(items, &raw, 16);
#pragma unroll
  for (int e = 0; e < per_vector; ++e) accumulate_one<Hist>(items[e], sum, bad, hist);
}

// Elements [begin, end) of one tensor, strided over the block's threads;
// 16-byte loads when the tensor is 16-byte aligned (chunks start at
// multiples of chunk_elements, so then every chunk is), scalar otherwise.
// check_unroll loads a thread are issued before their elements are added,
// in the order a one-at-a-time loop adds them, so the sums' bits do not
// depend on it (one load a thread at a time waited on a memory round trip
// per 4 KB of a block).
template <bool Hist, class T>
__device__ inline void accumulate_range(const T* data, std::int64_t begin, std::int64_t end, float& sum,
                                        int& bad, unsigned* hist) {
  constexpr int per_vector = 16 / sizeof(T);
  std::int64_t i = begin;
  if (reinterpret_cast<std::uintptr_t>(data) % 16 == 0) {
    const std::int64_t vectors = (end - begin) / per_vector;
    const uint4* v = reinterpret_cast<const uint4*>(data + begin);
    constexpr int U = check_unroll;
    const std::int64_t stride = blockDim.x;
    std::int64_t k = threadIdx.x;
    for (; k + (U - 1) * stride < vectors; k += U * stride) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) raw[u] = v[k + u * stride];
#pragma unroll
      for (int u = 0; u < U; ++u) accumulate_vector<Hist, T>(raw[u], sum, bad, hist);
    }
    // The rest (fewer than U a thread): every load issued before the first
    // is added, as above (a small slice is only this: the MLP's are 2 loads
    // a thread, which one at a time waited on two round trips).
    uint4 raw[U - 1];
#pragma unroll
    for (int u = 0; u < U - 1; ++u) {
      if (k + u * stride < vectors) raw[u] = v[k + u * stride];
    }
#pragma unroll
    for (int u = 0; u < U - 1; ++u) {
      if (k + u * stride < vectors) accumulate_vector<Hist, T>(raw[u], sum, bad, hist);
    }
    i = begin + vectors * per_vector;
  }
  for (std::int64_t k = i + threadIdx.x; k < end; k += blockDim.x) accumulate_one<Hist>(data[k], sum, bad, hist);
}

// block_sum_in_order (launch.cuh), then a barrier: the next call may
// write warp_sums again.
__device__ inline float block_sum(float x) {
  __shared__ float warp_sums[check_threads / 32];
  const float total = block_sum_in_order(x, warp_sums);
  __syncthreads();
  return total;  // valid in thread 0
}

// Work items are slices of chunks: `slices` per chunk, so that a list of
// few chunks (a small model: the MLP example's 1.9M gradients are 33
// chunks) still spreads over every multiprocessor. This block's items
// (blockIdx.x, then every gridDim.x-th): each item's partial sum and
// non-finite flag, summed over the block in a fixed order (block_sum), so
// an item's bits do not depend on the grid. With Hist, each warp also
// counts exponent bins in shared memory, and the block adds an item's
// counts to its tensor's row of `histogram`.
// With `any_bad`, a non-finite item also sets *any_bad to 1.
template <bool Hist>
__device__ inline void check_items(const TensorEntry* tensors, const Chunk* chunks, std::int64_t num_chunks,
                                   int slices, float* slice_sums, int* slice_bad, unsigned long long* histogram,
                                   unsigned* any_bad = nullptr) {
  constexpr int warps = check_threads / 32;
  __shared__ unsigned hist[Hist ? warps * histogram_bins : 1];
  unsigned* my_hist = hist + (Hist ? threadIdx.x / 32 * histogram_bins : 0);
  const std::int64_t items = num_chunks * slices;
  for (std::int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const Chunk ch = chunks[item / slices];
    const TensorEntry t = tensors[ch.tensor];
    // Slice boundaries on multiples of 8 elements keep 16-byte loads aligned.
    const std::int64_t per_slice = ((ch.end - ch.begin + slices - 1) / slices + 7) / 8 * 8;
    const std::int64_t begin = ch.begin + item % slices * per_slice;
    const std::int64_t end = begin + per_slice < ch.end ? begin + per_slice : ch.end;
    if constexpr (Hist) {
      for (int b = threadIdx.x; b < warps * histogram_bins; b += blockDim.x) hist[b] = 0;
      __syncthreads();
    }
    float sum = 0;
    int bad = 0;
    if (begin < end) {
      switch (t.dtype) {
        case DType::float16:
          accumulate_range<Hist>(static_cast<const half*>(t.data), begin, end, sum, bad, my_hist);
          break;
        case DType::bfloat16:
          accumulate_range<Hist>(static_cast<const bfloat16*>(t.data), begin, end, sum, bad, my_hist);
          break;
        case DType::float32:
          accumulate_range<Hist>(static_cast<const float*>(t.data), begin, end, sum, bad, my_hist);
          break;
      }
    }
    sum = block_sum(sum);  // synchronises: the shared counts are complete
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
      slice_sums[item] = sum;
      slice_bad[item] = bad;
      if (bad && any_bad != nullptr) atomicOr(any_bad, 1u);
    }
    if constexpr (Hist) {
      for (int b = threadIdx.x; b < histogram_bins; b += blockDim.x) {
        unsigned n = 0;
        for (int w = 0; w < warps; ++w) n += hist[w * histogram_bins + b];
        if (n != 0) atomicAdd(histogram + static_cast<std::int64_t>(ch.tensor) * histogram_bins + b, n);
      }
      __syncthreads();  // read before the next slice zeroes them
    }
  }
}

// One block, once every item's partials are written (and visible: read
// through L2): each tensor's sum of squares and non-finite flag, then the
// total and the flag over all, each in a fixed order, so the results do not
// depend on the order blocks ran in (and a replayed graph gives the eager
// bits). A thread per tensor when there is one slice per chunk (many
// chunks, many tensors: the threads share them out), a warp per tensor when
// chunks are sliced (few, large tensors, a few hundred partials each: lanes
// strided over them, then a fixed shuffle tree).
__device__ inline void reduce_check(const TensorEntry* tensors, int slices, int num_tensors, const float* slice_sums,
                                    const int* slice_bad, double* sum_squares, int* nonfinite, double* total,
                                    int* found_inf) {
  if (slices == 1) {
    for (int i = threadIdx.x; i < num_tensors; i += blockDim.x) {
      const TensorEntry t = tensors[i];
      const std::int64_t n = (t.numel + chunk_elements - 1) / chunk_elements;
      double s = 0;
      int b = 0;
      for (std::int64_t c = t.first_chunk; c < t.first_chunk + n; ++c) {
        s += __ldcg(slice_sums + c);
        b |= __ldcg(slice_bad + c);
      }
      sum_squares[i] = s;
      nonfinite[i] = b;
    }
  }
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int i = static_cast<int>(threadIdx.x / 32); slices > 1 && i < num_tensors; i += check_threads / 32) {
    const TensorEntry t = tensors[i];
    const std::int64_t n = (t.numel + chunk_elements - 1) / chunk_elements;
    double s = 0;
    int b = 0;
    for (std::int64_t c = t.first_chunk * slices + lane; c < (t.first_chunk + n) * slices; c += 32) {
      s += __ldcg(slice_sums + c);
      b |= __ldcg(slice_bad + c);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      s += __shfl_down_sync(0xffffffffu, s, offset);
      b |= __shfl_down_sync(0xffffffffu, b, offset);
    }
    if (lane == 0) {
      sum_squares[i] = s;
      nonfinite[i] = b;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    int b = 0;
    for (int i = 0; i < num_tensors; ++i) {
      s += sum_squares[i];
      b |= nonfinite[i];
    }
    *total = s;
    *found_inf = b;
  }
}

// Pass 1 as a kernel of its own: check_items, then the last block to finish
// reduces (reduce_check).
template <bool Hist>
__global__ void __launch_bounds__(check_threads)
    check_grads_kernel(const TensorEntry* tensors, const Chunk* chunks, std::int64_t num_chunks, int slices,
                       int num_tensors, float* slice_sums, int* slice_bad, double* sum_squares,
                       int* nonfinite, double* total, int* found_inf, unsigned int* blocks_done,
                       unsigned long long* histogram) {
  // The step after this pass is launched dependent on it (launch.cuh): it
  // may be scheduled now and waits for this grid's end before it reads.
  allow_dependent_launch();
  check_items<Hist>(tensors, chunks, num_chunks, slices, slice_sums, slice_bad, histogram);
  if (!last_block_to_finish(blocks_done)) return;
  reduce_check(tensors, slices, num_tensors, slice_sums, slice_bad, sum_squares, nonfinite, total, found_inf);
  if (threadIdx.x == 0) *blocks_done = 0;  // ready for the next launch (or graph replay)
}

// Pass 1's buffers, as a kernel that runs it takes them.
struct CheckBuffers {
  int slices;
  int num_tensors;
  float* slice_sums;
  int* slice_bad;
  double* sum_squares;
  int* nonfinite;
  double* total;
  int* found_inf;
  unsigned* any_bad;  // 0 between launches; the fused kernel's flag (check_items' any_bad)
  unsigned long long* histogram = nullptr;  // the exponent histograms to add to, if asked
};

}  // namespace detail

/// Results and workspace of pass 1 for one TensorList, in device memory.
class GradCheck {
 public:
  struct Host {
    std::vector<double> sum_squares;
    std::vector<int> nonfinite;
    double total_sum_squares = 0;
    bool found_inf = false;
  };

  explicit GradCheck(const TensorList& list)
      : slices_(slices_for(list.num_chunks())),
        slice_sums_(static_cast<std::size_t>(list.num_chunks()) * slices_ * sizeof(float), list.device()),
        slice_bad_(static_cast<std::size_t>(list.num_chunks()) * slices_ * sizeof(int), list.device()),
        sum_squares_(static_cast<std::size_t>(list.num_tensors()) * sizeof(double), list.device()),
        nonfinite_(static_cast<std::size_t>(list.num_tensors()) * sizeof(int), list.device()),
        scalars_(sizeof(double) + 2 * sizeof(int), list.device()),
        num_tensors_(list.num_tensors()),
        num_chunks_(list.num_chunks()) {
    mixprec::detail::DeviceGuard guard(list.device());
    MIXPREC_CUDA_CHECK(cudaMemset(scalars_.data(), 0, scalars_.bytes()));
  }

  /// One launch over every gradient of `list` (the list this was made for).
  /// Asynchronous on `stream`; never synchronises. With `histogram`
  /// (device, [tensor][64], zeroed by the caller) it also adds each
  /// tensor's exponent histogram (monitor::Bins) from the same reads.
  void launch(const TensorList& list, cudaStream_t stream = nullptr, std::uint64_t* histogram = nullptr) {
    MIXPREC_CHECK(list.num_chunks() == num_chunks_ && list.num_tensors() == num_tensors_,
                  "GradCheck::launch: the list has ", list.num_tensors(), " tensors / ",
                  list.num_chunks(), " chunks, this check was made for ", num_tensors_, " / ", num_chunks_);
    mixprec::detail::DeviceGuard guard(list.device());
    // Up to 8 blocks an SM (the kernel's 32 registers allow them): every
    // work item of a list of about kWorkItems at once. With 4, a list of 544
    // items (2^21 to 2^24 parameters of the benchmarks' model list) ran 16 of
    // them in a second round while the rest of the GPU idled.
    const unsigned grid = num_chunks_ == 0 ? 1u : grid_for(num_chunks_ * slices_ * detail::check_threads,
                                                           detail::check_threads, 8);
    auto* hist = reinterpret_cast<unsigned long long*>(histogram);
    static_assert(sizeof(unsigned long long) == sizeof(std::uint64_t), "64-bit counts");
    auto kernel = histogram == nullptr ? detail::check_grads_kernel<false> : detail::check_grads_kernel<true>;
    kernel<<<grid, detail::check_threads, 0, stream>>>(
        list.entries(), list.chunks(), num_chunks_, slices_, num_tensors_, static_cast<float*>(slice_sums_.data()),
        static_cast<int*>(slice_bad_.data()), sum_squares(), nonfinite(), total_sum_squares(), found_inf(),
        blocks_done(), hist);
    MIXPREC_CUDA_CHECK_LAUNCH("check_grads_kernel");
  }

  /// The buffers, for a kernel that runs pass 1 itself (the fused check
  /// and step, check_and_step_kernel in optimizer_step.cuh).
  detail::CheckBuffers buffers() const {
    return {slices_, num_tensors_, static_cast<float*>(slice_sums_.data()), static_cast<int*>(slice_bad_.data()),
            sum_squares(), nonfinite(), total_sum_squares(), found_inf(), blocks_done()};
  }
  std::int64_t num_chunks() const { return num_chunks_; }

  double* sum_squares() const { return static_cast<double*>(sum_squares_.data()); }
  int* nonfinite() const { return static_cast<int*>(nonfinite_.data()); }
  double* total_sum_squares() const { return static_cast<double*>(scalars_.data()); }
  int* found_inf() const { return reinterpret_cast<int*>(static_cast<char*>(scalars_.data()) + sizeof(double)); }

  /// Copies the results to the host; synchronises `stream`.
  Host read(cudaStream_t stream = nullptr) const {
    Host h;
    h.sum_squares.resize(static_cast<std::size_t>(num_tensors_));
    h.nonfinite.resize(static_cast<std::size_t>(num_tensors_));
    int flag = 0;
    if (num_tensors_ > 0) {
      MIXPREC_CUDA_CHECK(cudaMemcpyAsync(h.sum_squares.data(), sum_squares(), sum_squares_.bytes(),
                                         cudaMemcpyDeviceToHost, stream));
      MIXPREC_CUDA_CHECK(cudaMemcpyAsync(h.nonfinite.data(), nonfinite(), nonfinite_.bytes(),
                                         cudaMemcpyDeviceToHost, stream));
    }
    MIXPREC_CUDA_CHECK(cudaMemcpyAsync(&h.total_sum_squares, total_sum_squares(), sizeof(double),
                                       cudaMemcpyDeviceToHost, stream));
    MIXPREC_CUDA_CHECK(cudaMemcpyAsync(&flag, found_inf(), sizeof(int), cudaMemcpyDeviceToHost, stream));
    MIXPREC_CUDA_CHECK(cudaStreamSynchronize(stream));
    h.found_inf = flag != 0;
    return h;
  }

 private:
  // Slices per chunk, from the list alone: about kWorkItems work items (4
  // blocks on each of 128 multiprocessors: an H100 or H200 has 132), none
  // of fewer than 8 elements per thread; lists of many chunks keep one
  // slice per chunk. Not from the device's SM count: the slices fix the
  // summation order of the sums of squares, so the norm (and the clip
  // coefficient made from it) has the same bits on every GPU, and a
  // checkpoint resumes bit-exactly on another model.
 public:
  static constexpr std::int64_t kWorkItems = 512;
  static int slices_for(std::int64_t chunks) {
    if (chunks == 0) return 1;
    const std::int64_t most = chunk_elements / (detail::check_threads * 8);
    const std::int64_t s = (kWorkItems + chunks - 1) / chunks;
    return static_cast<int>(s < 1 ? 1 : s > most ? most : s);
  }
  int slices() const { return slices_; }

 private:
  // check_grads_kernel's block counter, and the fused kernel's any_bad
  // flag (CheckBuffers): 0 between launches either way.
  unsigned int* blocks_done() const {
    return reinterpret_cast<unsigned int*>(static_cast<char*>(scalars_.data()) + sizeof(double) + sizeof(int));
  }

  int slices_;  // work items per chunk
  Buffer slice_sums_, slice_bad_, sum_squares_, nonfinite_, scalars_;
  int num_tensors_ = 0;
  std::int64_t num_chunks_ = 0;
};

}  // namespace cuda
MIXPREC_NAMESPACE_END
