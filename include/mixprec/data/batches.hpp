// SPDX-License-Identifier: Apache-2.0
// Batches: a labelled data set held where the model trains (host or one
// CUDA device), served one fixed-size batch at a time in an order the host
// sets once per epoch. On a device, next() reads its position from device
// memory and advances it there, so it can be captured in a CUDA graph with
// the rest of a training step and replayed for every step of an epoch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace data {

template <class T>
class Batches {
 public:
  /// Copies `rows` ([n, ...], on any device) and their `labels` (host,
  /// n int32) to `device`. The order starts as 0, 1, ..., n - 1. On a
  /// device, every copy and next() runs on `stream`, which must outlive
  /// this object.
  Batches(TensorView<const T> rows, const std::vector<std::int32_t>& labels, std::int64_t batch,
          Device device = Device::cpu(), stream_t stream = nullptr)
      : device_(device), stream_(stream), batch_(batch) {
    const std::int64_t n = rows.shape().rank() >= 1 ? rows.shape()[0] : 0;
    MIXPREC_CHECK(rows.shape().rank() >= 2 && n > 0, "Batches: rows shape ", rows.shape(),
                  ", expected [n, features...] with n > 0");
    MIXPREC_CHECK(static_cast<std::int64_t>(labels.size()) == n, "Batches: labels.size() = ", labels.size(),
                  ", rows has ", n);
    MIXPREC_CHECK(n <= INT32_MAX, "Batches: n = ", n, " rows, at most ", INT32_MAX);
    MIXPREC_CHECK(batch > 0, "Batches: batch = ", batch, ", must be > 0");
    if (device.is_cuda()) mixprec::detail::require_nn_device_ops("Batches", device);
    std::vector<std::int64_t> batch_dims = rows.shape().dims();
    batch_dims[0] = batch;
    rows_ = Tensor<T>(rows.shape(), device);
    copy(rows, rows_, stream);
    x_ = Tensor<T>(Shape(batch_dims), device);
    const std::size_t nb = static_cast<std::size_t>(n) * sizeof(std::int32_t);
    row_labels_ = Buffer(nb, device);
    mixprec::detail::copy_raw(row_labels_.data(), device, labels.data(), Device::cpu(), nb, stream);
    labels_ = Buffer(static_cast<std::size_t>(batch) * sizeof(std::int32_t), device);
    order_ = Buffer(nb, device);
    cursor_ = Buffer(sizeof(std::int64_t), device);
    std::vector<std::int32_t> identity(static_cast<std::size_t>(n));
    std::iota(identity.begin(), identity.end(), 0);
    set_order(identity);
  }

  Device device() const { return device_; }
  stream_t stream() const { return stream_; }
  /// Rows in the data set.
  std::int64_t size() const { return rows_.shape()[0]; }
  std::int64_t batch() const { return batch_; }
  /// Whole batches in one pass over the order: size() / batch(). A pass of
  /// that many next() calls sees each row of the order at most once.
  std::int64_t full_batches() const { return size() / batch_; }

  /// Sets the order rows are served in (size() indices, each in [0,
  /// size()); a permutation for an epoch) and rewinds to its start. On a
  /// device this uploads it behind the work queued on stream() and waits
  /// for it: call it between epochs, not inside a captured step. A bad
  /// order changes nothing.
  void set_order(const std::vector<std::int32_t>& order) {
    MIXPREC_CHECK(static_cast<std::int64_t>(order.size()) == size(), "Batches::set_order: order.size() = ",
                  order.size(), ", the data set has ", size(), " rows");
    for (std::size_t i = 0; i < order.size(); ++i) {
      MIXPREC_CHECK(order[i] >= 0 && order[i] < size(), "Batches::set_order: order[", i, "] = ", order[i],
                    ", must be in [0, ", size(), ")");
    }
    mixprec::detail::copy_raw(order_.data(), device_, order.data(), Device::cpu(), order_.bytes(), stream_);
    const std::int64_t zero = 0;
    mixprec::detail::copy_raw(cursor_.data(), device_, &zero, Device::cpu(), sizeof zero, stream_);
  }
  /// A uniformly random permutation from `rng` (std::shuffle), then set_order.
  void shuffle(std::mt19937_64& rng) {
    std::vector<std::int32_t> order(static_cast<std::size_t>(size()));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    set_order(order);
  }

  /// Fills x() and labels() with the next batch: row order[(k * batch + b)
  /// % size()] at batch row b, for the k-th call since set_order (past
  /// the end the order wraps around). On a device: asynchronous on
  /// stream(), and the position lives in device memory, so a graph that
  /// captured next() serves a new batch on every replay.
  void next() {
    const std::size_t row_bytes = static_cast<std::size_t>(rows_.numel() / size()) * sizeof(T);
    auto* cursor = static_cast<std::int64_t*>(cursor_.data());
    const auto* order = static_cast<const std::int32_t*>(order_.data());
    const auto* row_labels = static_cast<const std::int32_t*>(row_labels_.data());
    auto* labels = static_cast<std::int32_t*>(labels_.data());
    if (device_.is_cuda()) {
      mixprec::detail::require_nn_device_ops("Batches::next", device_)
          .gather_batch(rows_.data(), row_bytes, row_labels, order, size(), cursor, batch_, x_.data(), labels,
                        stream_);
      return;
    }
    const auto* src = reinterpret_cast<const unsigned char*>(rows_.data());
    auto* dst = reinterpret_cast<unsigned char*>(x_.data());
    for (std::int64_t b = 0; b < batch_; ++b) {
      const std::int32_t r = order[(*cursor * batch_ + b) % size()];
      std::memcpy(dst + static_cast<std::size_t>(b) * row_bytes, src + static_cast<std::size_t>(r) * row_bytes,
                  row_bytes);
      labels[b] = row_labels[r];
    }
    ++*cursor;
  }

  /// The current batch, [batch, features...] on device().
  TensorView<const T> x() const { return x_.view(); }
  /// Its labels: batch() int32 on device().
  const std::int32_t* labels() const { return static_cast<const std::int32_t*>(labels_.data()); }

 private:
  Device device_;
  stream_t stream_ = nullptr;
  std::int64_t batch_;
  Tensor<T> rows_, x_;
  Buffer row_labels_, labels_, order_, cursor_;
};

}  // namespace data
MIXPREC_NAMESPACE_END
