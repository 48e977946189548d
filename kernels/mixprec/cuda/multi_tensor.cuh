// SPDX-License-Identifier: Apache-2.0
// Multi-tensor launches: a device-resident list of tensors (any sizes, zero
// included, any mix of fp16/bf16/fp32) cut into fixed-size chunks, so that one
// launch covers every parameter of an optimizer.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

/// One tensor of a multi-tensor launch, as the device sees it.
struct TensorEntry {
  const void* data;
  std::int64_t numel;
  std::int64_t first_chunk;  // this tensor's chunks are [first_chunk, first_chunk + ceil(numel / chunk))
  DType dtype;
};

/// A piece of one tensor: elements [begin, end). Chunks start at multiples
/// of chunk_elements, so a chunk is 16-byte aligned whenever its tensor is.
struct Chunk {
  std::int32_t tensor;
  std::int64_t begin;
  std::int64_t end;
};

/// Elements per chunk: large enough that a block has real work, small enough
/// that a 2^30-element list gives the grid thousands of chunks.
inline constexpr std::int64_t chunk_elements = std::int64_t{1} << 16;

/// The tensors and chunks of a list, copied to the device once (set-up: the
/// copy synchronises). Reused by every launch over the same tensors.
class TensorList {
 public:
  TensorList() = default;
  /// All tensors must be on the same CUDA device.
  explicit TensorList(const std::vector<TensorRef>& tensors) {
    MIXPREC_CHECK(tensors.size() < (std::size_t{1} << 31), "TensorList: ", tensors.size(),
                  " tensors, at most 2^31 - 1");
    std::vector<TensorEntry> entries;
    std::vector<Chunk> chunks;
    std::vector<std::int64_t> offsets{0};
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const TensorRef& t = tensors[i];
      MIXPREC_CHECK(t.device().is_cuda() && t.device() == tensors[0].device(), "TensorList: tensor ",
                    i, " is on ", t.device(), ", expected one CUDA device (", tensors[0].device(), ")");
      entries.push_back({t.data(), t.numel(), static_cast<std::int64_t>(chunks.size()), t.dtype()});
      if (i == 0) uniform_dtype_ = t.dtype();
      if (t.dtype() != tensors[0].dtype()) uniform_dtype_.reset();
      first_chunk_.push_back(static_cast<std::int64_t>(chunks.size()));
      for (std::int64_t b = 0; b < t.numel(); b += chunk_elements) {
        chunks.push_back({static_cast<std::int32_t>(i), b, std::min(b + chunk_elements, t.numel())});
        offsets.push_back(offsets.back() + (chunks.back().end - b));
      }
    }
    first_chunk_.push_back(static_cast<std::int64_t>(chunks.size()));
    num_tensors_ = static_cast<int>(entries.size());
    num_chunks_ = static_cast<std::int64_t>(chunks.size());
    if (!entries.empty()) device_ = tensors[0].device();
    num_elements_ = offsets.back();
    entries_ = upload(entries);
    chunks_ = upload(chunks);
    offsets_ = upload(offsets);
  }

  int num_tensors() const { return num_tensors_; }
  std::int64_t num_chunks() const { return num_chunks_; }
  Device device() const { return device_; }
  /// The tensors' dtype when all have the same (none when empty).
  std::optional<DType> uniform_dtype() const { return uniform_dtype_; }
  /// Index of tensor i's first chunk (i = num_tensors(): num_chunks()); the
  /// chunks of tensors [a, b) are [first_chunk(a), first_chunk(b)).
  std::int64_t first_chunk(int i) const {
    MIXPREC_CHECK(0 <= i && i <= num_tensors_, "TensorList::first_chunk: i = ", i, ", there are ", num_tensors_,
                  " tensors");
    return first_chunk_.empty() ? 0 : first_chunk_[static_cast<std::size_t>(i)];
  }
  const TensorEntry* entries() const { return static_cast<const TensorEntry*>(entries_.data()); }
  const Chunk* chunks() const { return static_cast<const Chunk*>(chunks_.data()); }
  /// Where each chunk starts in the chunks laid end to end (device,
  /// num_chunks() + 1 entries, the last one num_elements()).
  const std::int64_t* chunk_offsets() const { return static_cast<const std::int64_t*>(offsets_.data()); }
  /// Elements of every tensor together.
  std::int64_t num_elements() const { return num_elements_; }

 private:
  template <class T>
  Buffer upload(const std::vector<T>& items) {
    Buffer b(items.size() * sizeof(T), device_);
    if (!items.empty()) {
      mixprec::detail::DeviceGuard guard(device_);
      MIXPREC_CUDA_CHECK(cudaMemcpy(b.data(), items.data(), items.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    return b;
  }

  int num_tensors_ = 0;
  std::int64_t num_chunks_ = 0;
  Device device_ = Device::cuda(0);
  std::optional<DType> uniform_dtype_;
  std::int64_t num_elements_ = 0;
  Buffer entries_, chunks_, offsets_;
  std::vector<std::int64_t> first_chunk_;  // host copy, num_tensors + 1 entries
};

}  // namespace cuda
MIXPREC_NAMESPACE_END
