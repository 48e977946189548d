// SPDX-License-Identifier: Apache-2.0
// GradientReducer: sums a data-parallel model's gradients over the ranks of
// a Communicator, bucket by bucket as the backward pass produces them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/core/stream.hpp"
#include "mixprec/dist/communicator.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

struct ReducerOptions {
  /// Largest bucket, in bytes of gradient: PyTorch DDP's bucket_cap_mb = 25
  /// (MiB). A gradient larger than this is a bucket of its own.
  std::size_t bucket_bytes = std::size_t{25} << 20;
};

/// The gradients of an optimizer's parameters, summed over the ranks.
///
/// Buckets: the parameters are taken last to first (the backward pass
/// produces the last layer's gradients first) and cut into runs of one
/// dtype of at most options.bucket_bytes. The trainer calls mark_ready(i)
/// once its backward has written gradient i, and a bucket's reduction
/// starts as soon as all its gradients are ready (or calls reduce() alone
/// at the end); reduce() reduces what is left and ends the iteration.
///
/// Every gradient then holds the SUM over the ranks, the same bits on every
/// rank; the mean is taken in the unscale (GradScaler::set_grad_divisor
/// with comm.size(): no pass of its own). An overflow of the sum is an inf
/// that the check pass finds on every rank alike: every rank skips.
///
/// Host communicators (MPI): a bucket's gradients are summed in place as one
/// list (reduce_scatter_sum, all_gather_slices), while the caller waits (no
/// overlap with the backward on the CPU). The gradients are never written
/// otherwise.
///
/// Device communicators (NCCL): a ready bucket is reduced on the reducer's
/// own side stream, which first waits (an event, on the device) for the
/// work queued so far on the caller's stream, so the collective overlaps
/// whatever the caller queues next (the rest of the backward); reduce()
/// makes the caller's stream wait for the side stream. Nothing waits on
/// the host, and the whole pattern can be captured in a CUDA graph.
class GradientReducer {
 public:
  GradientReducer(Communicator& comm, const optim::Optimizer& opt, const ReducerOptions& options = {})
      : comm_(&comm), opt_(&opt) {
    MIXPREC_CHECK(options.bucket_bytes > 0, "GradientReducer: bucket_bytes = 0, must be > 0");
    std::vector<TensorRef> grads;
    for (std::size_t i = 0; i < opt.num_params(); ++i) {
      const TensorRef& g = opt.param(i).grad;
      MIXPREC_CHECK(g.device() == comm.device(), "GradientReducer: parameter \"", opt.param(i).name,
                    "\": its gradient is on ", g.device(), ", the ", comm.backend(), " communicator reduces tensors on ",
                    comm.device());
      MIXPREC_CHECK(!g.read_only(), "GradientReducer: parameter \"", opt.param(i).name,
                    "\": the gradient is a read-only view; the reduction writes it");
      grads.push_back(g);
    }
    grads_ = std::move(grads);
    bucket_of_.assign(grads_.size(), 0);
    // Last parameter first; a new bucket when the dtype changes or the next
    // gradient would pass the cap.
    for (std::size_t k = grads_.size(); k-- > 0;) {
      const TensorRef& g = grads_[k];
      const bool fresh = buckets_.empty() || buckets_.back().dtype != g.dtype() ||
                         buckets_.back().bytes + g.bytes() > options.bucket_bytes;
      if (fresh) buckets_.push_back(Bucket{g.dtype(), 0, {}, 0, false, Buffer(), std::nullopt});
      Bucket& b = buckets_.back();
      b.params.push_back(k);
      b.bytes += g.bytes();
      bucket_of_[k] = buckets_.size() - 1;
    }
    // Device buckets of several gradients are packed into one buffer for
    // one collective; host buckets go to the communicator as they are (its
    // reduce-scatter and all-gather take tensor lists: no packing here).
    for (Bucket& b : buckets_) {
      if (b.params.size() > 1 && comm.device().is_cuda()) b.staging = Buffer(b.bytes, comm.device());
    }
    ready_.assign(grads_.size(), false);
    if (comm.device().is_cuda()) {
      side_.emplace(comm.device());
      for (Bucket& b : buckets_) b.start.emplace(comm.device());
      joined_.emplace(comm.device());
    }
  }

  std::size_t num_buckets() const { return buckets_.size(); }
  /// The bucket parameter i's gradient belongs to (0: the last parameters).
  std::size_t bucket_of(std::size_t i) const {
    check_index(i, "bucket_of");
    return bucket_of_[i];
  }
  /// Bytes of gradient in bucket b.
  std::size_t bucket_bytes(std::size_t b) const { return buckets_.at(b).bytes; }
  const Communicator& communicator() const { return *comm_; }

  /// Gradient i is written: once every gradient of its bucket is, the
  /// bucket is reduced. Marking a gradient twice in one iteration is an
  /// error (nothing changes).
  void mark_ready(std::size_t i, stream_t stream = nullptr) {
    check_index(i, "mark_ready");
    MIXPREC_CHECK(!ready_[i], "GradientReducer::mark_ready: gradient ", i,
                  " is already marked ready in this iteration (call reduce() to end it)");
    if (!checked_) check_same_gradients("mark_ready");
    ready_[i] = true;
    Bucket& b = buckets_[bucket_of_[i]];
    b.ready += 1;
    if (b.ready == b.params.size()) reduce_bucket(b, stream);
  }

  /// Reduces every bucket not reduced yet, then starts the next iteration:
  /// on return every gradient holds the sum over the ranks.
  void reduce(stream_t stream = nullptr) {
    if (!checked_) check_same_gradients("reduce");
    for (Bucket& b : buckets_) {
      if (!b.done) reduce_bucket(b, stream);
    }
    if (side_) {  // the caller's stream goes on once the side stream is done
      joined_->record(side_->get());
      joined_->make_wait(stream);
    }
    for (Bucket& b : buckets_) {
      b.ready = 0;
      b.done = false;
    }
    std::fill(ready_.begin(), ready_.end(), false);
    checked_ = false;
  }

 private:
  struct Bucket {
    DType dtype;
    std::size_t bytes;
    std::vector<std::size_t> params;  // in the order they were added (last parameter first)
    std::size_t ready;
    bool done;
    Buffer staging;  // several gradients: reduced as one buffer
    std::optional<Event> start;  // device: the caller's stream when the bucket was ready
  };

  // The reducer reduces the buffers it was built with: a parameter added
  // or rebound since (Optimizer::rebind) would go unsummed, and a freed
  // buffer be written. Refused, naming the parameter.
  // Once an iteration (the first mark_ready or reduce), not per gradient.
  void check_same_gradients(const char* what) {
    MIXPREC_CHECK(opt_->num_params() == grads_.size(), "GradientReducer::", what, ": the optimizer has ",
                  opt_->num_params(), " parameters, the reducer was built for ", grads_.size(),
                  "; build the reducer after adding every group");
    for (std::size_t i = 0; i < grads_.size(); ++i) {
      const TensorRef& g = opt_->param(i).grad;
      MIXPREC_CHECK(g.data() == grads_[i].data() && g.bytes() == grads_[i].bytes(), "GradientReducer::", what,
                    ": parameter \"", opt_->param(i).name, "\" was rebound to another gradient buffer since the "
                    "reducer was built; build a new reducer");
    }
    checked_ = true;
  }

  void check_index(std::size_t i, const char* what) const {
    MIXPREC_CHECK(i < grads_.size(), "GradientReducer::", what, ": parameter index ", i, ", there are ",
                  grads_.size());
  }

  static TensorRef view_of(void* p, DType t, std::int64_t n, Device d) {
    switch (t) {
      case DType::float16:
        return TensorView<half>(static_cast<half*>(p), {n}, d);
      case DType::bfloat16:
        return TensorView<bfloat16>(static_cast<bfloat16*>(p), {n}, d);
      case DType::float32:
        break;
    }
    return TensorView<float>(static_cast<float*>(p), {n}, d);
  }

  void reduce_bucket(Bucket& b, stream_t caller) {
    stream_t stream = caller;
    if (side_) {  // fork: the side stream waits for the caller's work so far
      b.start->record(caller);
      b.start->make_wait(side_->get());
      stream = side_->get();
    }
    if (b.params.size() == 1) {
      comm_->all_reduce_sum(grads_[b.params[0]], stream);
    } else if (!side_) {
      // Host: the bucket's gradients as one flat sequence, summed in place
      // (the bits all_reduce_sum gives each element, whatever the slicing).
      std::vector<TensorRef> list;
      std::int64_t n = 0;
      for (std::size_t k : b.params) {
        list.push_back(grads_[k]);
        n += grads_[k].numel();
      }
      const std::vector<std::int64_t> bounds = even_bounds(n, comm_->size());
      comm_->reduce_scatter_sum(list, bounds, stream);
      comm_->all_gather_slices(list, bounds, stream);
    } else {
      const Device d = comm_->device();
      char* staging = static_cast<char*>(b.staging.data());
      std::size_t at = 0;
      for (std::size_t k : b.params) {
        mixprec::detail::copy_raw(staging + at, d, grads_[k].data(), d, grads_[k].bytes(), stream);
        at += grads_[k].bytes();
      }
      comm_->all_reduce_sum(view_of(staging, b.dtype, static_cast<std::int64_t>(b.bytes / dtype_size(b.dtype)), d),
                            stream);
      at = 0;
      for (std::size_t k : b.params) {
        mixprec::detail::copy_raw(const_cast<void*>(grads_[k].data()), d, staging + at, d, grads_[k].bytes(), stream);
        at += grads_[k].bytes();
      }
    }
    b.done = true;
  }

  Communicator* comm_;
  const optim::Optimizer* opt_;
  std::vector<TensorRef> grads_;
  std::vector<Bucket> buckets_;
  std::vector<std::size_t> bucket_of_;
  std::vector<bool> ready_;
  bool checked_ = false;  // check_same_gradients ran this iteration
  std::optional<Stream> side_;   // device communicators: where the collectives run
  std::optional<Event> joined_;  // the side stream's end, waited for by reduce()'s stream
};

}  // namespace dist
MIXPREC_NAMESPACE_END
