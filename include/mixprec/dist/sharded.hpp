// SPDX-License-Identifier: Apache-2.0
// ShardedOptimizer: ZeRO-1 over a Communicator. Each rank keeps the fp32
// masters and optimizer state of one contiguous slice of the parameters.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/dist/communicator.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/tensor/tensor_view.hpp"

namespace mixprec::dist {

/// ZeRO-1 for optimizer `Opt` (optim::AdamW, SGD, ...): the parameters,
/// taken in order as one flat sequence of N elements, are cut into size()
/// contiguous slices (the first N % size() ranks get one element more), and
/// this rank's optimizer (shard()) holds masters and state for its slice
/// only: 1 / size() of the memory. A parameter may be split between two
/// ranks; a zero-size one belongs to none.
///
/// A step, on every rank:
///
///     sharded.reduce_gradients();              // the gradients summed over the ranks
///     scaler.step(sharded.shard());            // check + update of this rank's slice
///     scaler.update();
///     sharded.gather_weights();                // every rank's updated weights to every rank
///
/// with the scaler's divisor set to size() and its stats reducer to
/// stats_reducer() (once, before the first step): each rank's non-finite
/// flag and sum of squares are combined in one all-gather of 16 bytes a rank, so
/// skip, scale and clip coefficient are the same on every rank.
///
/// Numerics: the gradients are all-reduced as GradientReducer does, so each
/// rank's slice holds exactly the sums the unsharded data-parallel run
/// sees; without clipping the weights are then bit-identical to that run's.
/// With clipping the job's sum of squares adds the slices' sums, another
/// order than one rank's pass over every gradient: the coefficient may
/// differ in its last bit. This first version moves as many bytes as plain
/// data parallelism (an all-reduce, not a reduce-scatter); it saves the
/// memory, not the traffic. Host communicators (MPI) only.
template <class Opt>
class ShardedOptimizer {
 public:
  ShardedOptimizer(Communicator& comm, std::vector<optim::Param> params, const typename Opt::options_type& options)
      : comm_(&comm), params_(std::move(params)) {
    MIXPREC_CHECK(comm.device().is_cpu(), "ShardedOptimizer: the ", comm.backend(),
                  " communicator is on ", comm.device(), "; this version shards host parameters (MPI) only");
    std::int64_t total = 0;
    for (const optim::Param& p : params_) {
      MIXPREC_CHECK(p.weight.device().is_cpu() && p.grad.device().is_cpu(), "ShardedOptimizer: parameter \"",
                    p.name, "\" is on ", p.weight.device(), "; host parameters only");
      total += p.weight.numel();
    }
    const int w = comm.size(), r = comm.rank();
    MIXPREC_CHECK(total >= w, "ShardedOptimizer: ", total, " elements for ", w,
                  " ranks; every rank needs a slice of at least one element");
    // Slice r: [begin(r), begin(r + 1)).
    auto begin = [&](int k) { return k * (total / w) + std::min<std::int64_t>(k, total % w); };
    lo_ = begin(r);
    hi_ = begin(r + 1);
    // This rank's pieces: views of the part of each parameter in [lo, hi).
    std::vector<optim::Param> pieces;
    std::int64_t at = 0;
    for (const optim::Param& p : params_) {
      const std::int64_t n = p.weight.numel(), a = std::max(at, lo_), b = std::min(at + n, hi_);
      if (a < b) pieces.push_back({p.name + "@" + std::to_string(a - at), slice(p.weight, a - at, b - a),
                                   slice(p.grad, a - at, b - a)});
      at += n;
    }
    shard_ = std::make_unique<Opt>(std::move(pieces), options);
    // Bytes of each rank's slice of the packed weights (dtypes may differ).
    slice_bytes_.assign(static_cast<std::size_t>(w), 0);
    std::size_t all = 0;
    at = 0;
    for (const optim::Param& p : params_) {
      for (int k = 0; k < w; ++k) {
        const std::int64_t a = std::max(at, begin(k)), b = std::min(at + p.weight.numel(), begin(k + 1));
        if (a < b) slice_bytes_[static_cast<std::size_t>(k)] += static_cast<std::size_t>(b - a) * dtype_size(p.weight.dtype());
      }
      at += p.weight.numel();
      all += p.weight.bytes();
    }
    packed_.resize(all);
  }

  /// This rank's optimizer: masters and state of its slice only.
  Opt& shard() { return *shard_; }
  const Opt& shard() const { return *shard_; }
  /// This rank's slice of the flat parameter sequence: [first, last).
  std::int64_t first() const { return lo_; }
  std::int64_t last() const { return hi_; }

  /// The scaler's stats reducer (GradScaler::set_stats_reducer): the or of
  /// the ranks' non-finite flags and the sum of their sums of squares.
  amp::GradScaler::StatsReducer stats_reducer() {
    return [this](bool& found_inf, double& total) { combine(found_inf, total); };
  }

  /// After the backward: every gradient becomes the sum over the ranks.
  void reduce_gradients() {
    for (const optim::Param& p : params_) comm_->all_reduce_sum(p.grad);
  }

  /// After the step: every rank's updated slice of the weights to every
  /// rank (one all-gather of the packed 16-bit weights).
  void gather_weights() {
    // Pack the weights in parameter order (this rank's slice is then one
    // contiguous piece), gather every rank's piece in place, unpack.
    std::size_t off = 0;
    for (const optim::Param& p : params_) {
      if (p.weight.bytes() != 0) std::memcpy(packed_.data() + off, p.weight.data(), p.weight.bytes());  // (no null source)
      off += p.weight.bytes();
    }
    comm_->all_gather(packed_.data(), slice_bytes_);
    off = 0;
    for (const optim::Param& p : params_) {
      if (p.weight.bytes() != 0) std::memcpy(const_cast<void*>(p.weight.data()), packed_.data() + off, p.weight.bytes());
      off += p.weight.bytes();
    }
  }

 private:
  static TensorRef slice(const TensorRef& t, std::int64_t offset, std::int64_t count) {
    return t.visit([&](auto v) -> TensorRef {
      using T = typename decltype(v)::value_type;
      return TensorView<T>(const_cast<T*>(v.data()) + offset, {count}, v.device());
    });
  }
  // Every rank's {sum of squares, flag} gathered (16 bytes a rank), then
  // added up in rank order in double: the same bits on every rank.
  void combine(bool& found_inf, double& total) {
    const auto w = static_cast<std::size_t>(comm_->size()), r = static_cast<std::size_t>(comm_->rank());
    std::vector<double> all(2 * w, 0.0);
    all[2 * r] = total;
    all[2 * r + 1] = found_inf ? 1.0 : 0.0;
    comm_->all_gather(all.data(), std::vector<std::size_t>(w, 2 * sizeof(double)));
    total = 0;
    found_inf = false;
    for (std::size_t k = 0; k < w; ++k) {
      total += all[2 * k];
      found_inf = found_inf || all[2 * k + 1] != 0.0;
    }
  }

  Communicator* comm_;
  std::vector<optim::Param> params_;
  std::vector<std::size_t> slice_bytes_;  // of the packed weights, per rank
  std::int64_t lo_ = 0, hi_ = 0;
  std::unique_ptr<Opt> shard_;
  std::vector<unsigned char> packed_;
};

}  // namespace mixprec::dist
