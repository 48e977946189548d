// SPDX-License-Identifier: Apache-2.0
// Communicator: the collectives data parallelism needs, over an existing
// engine (MPI for host tensors, NCCL for device tensors; mixprec has no
// transport of its own), and the one-process communicator.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/dist/watchdog.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

/// How a host communicator adds 16-bit gradients (fp16, bf16) over the
/// ranks. The ranks' values are always added in rank order, by the rank that
/// owns the element (see MpiCommunicator); this says in what precision.
enum class Accumulation {
  /// In the tensor's type, as PyTorch DDP and NCCL do: each addition is
  /// computed in float and rounded to the type (W - 1 roundings).
  own_type,
  /// In float, rounded once to the type at the end. The bytes on the wire
  /// are the same 16-bit values either way.
  float32,
};

/// The slices of a flat sequence of n elements over w ranks: rank k owns
/// [even_bounds(n, w)[k], even_bounds(n, w)[k + 1]); the first n % w ranks
/// take one element more.
inline std::vector<std::int64_t> even_bounds(std::int64_t n, int w) {
  MIXPREC_CHECK(n >= 0 && w > 0, "even_bounds: n = ", n, ", w = ", w, "; need n >= 0 and w > 0");
  std::vector<std::int64_t> b(static_cast<std::size_t>(w) + 1);
  for (int k = 0; k <= w; ++k) b[static_cast<std::size_t>(k)] = k * (n / w) + std::min<std::int64_t>(k, n % w);
  return b;
}

namespace detail {

// A list of tensors seen as one flat sequence of elements (in list order).
class FlatSequence {
 public:
  explicit FlatSequence(const std::vector<TensorRef>& ts) : ts_(&ts), start_(ts.size() + 1, 0) {
    for (std::size_t i = 0; i < ts.size(); ++i) start_[i + 1] = start_[i] + ts[i].numel();
  }
  std::int64_t size() const { return start_.back(); }
  // f(tensor index, first element in that tensor, count) for every piece of
  // [a, b), in order.
  template <class F>
  void for_each_piece(std::int64_t a, std::int64_t b, F&& f) const {
    if (a >= b) return;
    // The first tensor that ends after a.
    std::size_t i = static_cast<std::size_t>(std::upper_bound(start_.begin(), start_.end(), a) - start_.begin()) - 1;
    for (; i < ts_->size() && start_[i] < b; ++i) {
      const std::int64_t lo = std::max(a, start_[i]), hi = std::min(b, start_[i + 1]);
      if (lo < hi) f(i, lo - start_[i], hi - lo);
    }
  }
  // Bytes of the elements in [a, b).
  std::size_t bytes(std::int64_t a, std::int64_t b) const {
    std::size_t n = 0;
    for_each_piece(a, b, [&](std::size_t i, std::int64_t, std::int64_t c) {
      n += static_cast<std::size_t>(c) * dtype_size((*ts_)[i].dtype());
    });
    return n;
  }

 private:
  const std::vector<TensorRef>* ts_;
  std::vector<std::int64_t> start_;  // start_[i]: the first element of tensor i
};

}  // namespace detail

/// One process's view of a group of processes (ranks) that train one model
/// together, each on its own share of the batch. Collectives are called by
/// every rank in the same order with the same sizes (MPI's and NCCL's rule).
///
/// Numerics: every collective gives every rank the same bits (the engines
/// do not promise that for a plain all-reduce; the backends here arrange
/// it, see each one). How 16-bit tensors are summed is accumulation(); an
/// overflow of the sum is an inf like any other, and the step is skipped
/// on every rank.
///
/// Errors: a failed collective throws mixprec::Error naming the call and
/// the engine's message. A rank that fails must not leave the others
/// waiting in a collective: abort() ends the whole job (MPI_Abort,
/// ncclCommAbort), and the backends call it from their destructor when an
/// exception is unwinding.
class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  /// "mpi", "nccl" or "local".
  virtual const char* backend() const = 0;
  /// This process's rank in [0, size()), and the number of ranks.
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// This process's rank among the ranks on its node, and their number
  /// (what picks the GPU: Device::cuda(local_rank() % devices)).
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  /// Where the tensors it reduces live: the CPU for MPI, the rank's GPU
  /// for NCCL.
  virtual Device device() const = 0;
  /// How sums of 16-bit tensors are accumulated.
  virtual Accumulation accumulation() const { return Accumulation::own_type; }

  /// In place: every element of `t` becomes the sum over the ranks of that
  /// element, the same bits on every rank. fp16, bf16 or fp32. Host
  /// communicators: blocking. Device communicators: queued on `stream`.
  virtual void all_reduce_sum(const TensorRef& t, stream_t stream = nullptr) = 0;
  /// In place: `bytes` bytes at `data` (on device()) take rank `root`'s value.
  virtual void broadcast(void* data, std::size_t bytes, int root, stream_t stream = nullptr) = 0;
  /// In place: `data` holds size() pieces back to back, piece r of
  /// `bytes[r]` bytes; afterwards every rank holds every rank's own piece
  /// (an all-gather). MPI and one rank; NCCL: not yet.
  virtual void all_gather(void* data, const std::vector<std::size_t>& bytes, stream_t stream = nullptr) {
    (void)data;
    (void)bytes;
    (void)stream;
    mixprec::detail::throw_error(backend(), " all_gather: not in this backend yet");
  }
  /// ZeRO-1's two collectives, over `ts` taken as one flat sequence of
  /// elements (in list order; dtypes may differ) cut into size() slices:
  /// rank k's slice is [bounds[k], bounds[k + 1]), with bounds[0] = 0 and
  /// bounds[size()] = the number of elements (even_bounds() cuts evenly).
  /// Every rank passes the same shapes, dtypes and bounds.
  ///
  /// reduce_scatter_sum: afterwards this rank's slice holds the sum over
  /// the ranks (as all_reduce_sum would give it, the same bits); the other
  /// elements hold unspecified values.
  virtual void reduce_scatter_sum(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                                  stream_t stream = nullptr) {
    (void)ts;
    (void)bounds;
    (void)stream;
    mixprec::detail::throw_error(backend(), " reduce_scatter_sum: not in this backend yet");
  }
  /// all_gather_slices: afterwards every rank's slice holds what its owner
  /// holds, on every rank.
  virtual void all_gather_slices(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                          stream_t stream = nullptr) {
    (void)ts;
    (void)bounds;
    (void)stream;
    mixprec::detail::throw_error(backend(), " all_gather_slices: not in this backend yet");
  }
  /// In place, at `found_inf` and `sum` (in device() memory): the flag
  /// becomes nonzero on every rank if it is nonzero on any, and the double
  /// the sum over the ranks, the same bits on every rank. What a sharded
  /// optimizer's check pass hands the scaler (ZeRO-1 on GPUs: one launch of
  /// 12 bytes, queued on `stream`, captured in a graph like any other).
  virtual void all_reduce_check(int* found_inf, double* sum, stream_t stream = nullptr) {
    (void)found_inf;
    (void)sum;
    (void)stream;
    mixprec::detail::throw_error(backend(), " all_reduce_check: not in this backend yet");
  }
  /// Returns once every rank has called it (host-side; device
  /// communicators also wait for their streams' work queued so far).
  virtual void barrier() = 0;
  /// Ends every rank of the job now, with `code`: what a rank that cannot
  /// go on calls, so that no other rank waits for it forever.
  [[noreturn]] virtual void abort(int code) noexcept = 0;

  /// The exit status of a rank whose watchdog ended it (sysexits.h's
  /// EX_TEMPFAIL; not 124, which `timeout` gives a command it stopped).
  static constexpr int kTimeoutExit = 75;

  /// A time-out on every collective from now on (0: none, the default; MPI
  /// and NCCL have none of their own). A watchdog thread (dist/watchdog.hpp)
  /// watches each collective: the host call of a host communicator, the
  /// stream's progress past a device collective (an event recorded after
  /// it; not inside a CUDA graph capture: watch a replay with
  /// watch_stream). One that has not finished after `timeout` makes this
  /// rank print "mixprec: <backend> rank R of W: <collective> has not
  /// finished after ..." and end (NCCL: ncclCommAbort first) with
  /// kTimeoutExit; mpirun then ends the other ranks. Device communicators
  /// also end on an error the engine reports asynchronously. `on_expiry`
  /// replaces the message and the exit (tests; a trainer that saves
  /// something first must still end the process). Choose the time-out far
  /// above the slowest collective: a slow rank is ended like a hung one.
  void set_timeout(std::chrono::milliseconds timeout, Watchdog::Expired on_expiry = {}) {
    MIXPREC_CHECK(timeout.count() >= 0, backend(), " set_timeout: timeout = ", timeout.count(),
                  " ms, must be >= 0 (0: none)");
    watchdog_.reset();
    if (timeout.count() == 0) return;
    if (!on_expiry) {
      on_expiry = [this, timeout](const std::string& what, double seconds) {
        print_expiry(backend(), rank(), size(), what, seconds, timeout);
        timed_out();
      };
    }
    watchdog_ = std::make_unique<Watchdog>(timeout, std::move(on_expiry), health());
  }
  /// The time-out set_timeout() set (0: none).
  std::chrono::milliseconds timeout() const {
    return watchdog_ ? watchdog_->timeout() : std::chrono::milliseconds(0);
  }

 protected:
  /// Called on the watchdog's thread when it fires (default handler): end
  /// this process now. A backend may release its engine first; it must not
  /// call into the engine from this thread otherwise (MPI is initialised
  /// for one thread at a time).
  [[noreturn]] virtual void timed_out() noexcept { std::_Exit(kTimeoutExit); }
  /// An error the engine reports asynchronously, polled by the watchdog
  /// (empty: none); none by default.
  virtual Watchdog::Health health() { return {}; }
  /// Backends call it first in their destructor: the watchdog's thread
  /// calls into the backend.
  void stop_watchdog() { watchdog_.reset(); }
  Watchdog* watchdog() { return watchdog_.get(); }

  /// A blocking collective under the watchdog: watched from construction
  /// to destruction (nothing without a time-out).
  class Watched {
   public:
    Watched(Watchdog* w, const char* what) {
      if (w == nullptr) return;
      done_ = std::make_shared<std::atomic<bool>>(false);
      w->watch(what, [d = done_] { return d->load(); });
    }
    ~Watched() {
      if (done_) done_->store(true);
    }
    Watched(const Watched&) = delete;
    Watched& operator=(const Watched&) = delete;

   private:
    std::shared_ptr<std::atomic<bool>> done_;
  };

  void check_reducible(const TensorRef& t, const char* what) const {
    MIXPREC_CHECK(t.device() == device(), backend(), " ", what, ": the tensor is on ", t.device(),
                  ", this communicator reduces tensors on ", device());
    MIXPREC_CHECK(!t.read_only(), backend(), " ", what, ": the tensor is a read-only view");
  }
  // The tensors and bounds of reduce_scatter_sum / all_gather_slices.
  void check_slices(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                    const char* what) const {
    std::int64_t n = 0;
    for (std::size_t i = 0; i < ts.size(); ++i) {
      MIXPREC_CHECK(ts[i].device() == device(), backend(), " ", what, ": tensor ", i, " is on ", ts[i].device(),
                    ", this communicator works on tensors on ", device());
      MIXPREC_CHECK(!ts[i].read_only(), backend(), " ", what, ": tensor ", i, " is a read-only view");
      n += ts[i].numel();
    }
    MIXPREC_CHECK(static_cast<int>(bounds.size()) == size() + 1, backend(), " ", what, ": ", bounds.size(),
                  " bounds for ", size(), " ranks; need size() + 1");
    MIXPREC_CHECK(bounds.front() == 0 && bounds.back() == n, backend(), " ", what, ": bounds run from ",
                  bounds.front(), " to ", bounds.back(), "; need 0 to ", n, " (the tensors' elements)");
    for (std::size_t k = 0; k + 1 < bounds.size(); ++k) {
      MIXPREC_CHECK(bounds[k] <= bounds[k + 1], backend(), " ", what, ": bounds[", k, "] = ", bounds[k],
                    " > bounds[", k + 1, "] = ", bounds[k + 1], "; they must not decrease");
    }
  }

 private:
  std::unique_ptr<Watchdog> watchdog_;  // set_timeout(); null: no time-out
};

/// One rank: every collective is the identity. For single-process runs of
/// data-parallel code, and tests.
class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(Device device = Device::cpu()) : device_(device) {}
  const char* backend() const override { return "local"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  Device device() const override { return device_; }
  void all_reduce_sum(const TensorRef& t, stream_t) override { check_reducible(t, "all_reduce_sum"); }
  void broadcast(void*, std::size_t, int root, stream_t) override {
    MIXPREC_CHECK(root == 0, "local broadcast: root = ", root, ", there is one rank");
  }
  void all_gather(void*, const std::vector<std::size_t>& bytes, stream_t) override {
    MIXPREC_CHECK(bytes.size() == 1, "local all_gather: ", bytes.size(), " pieces, there is one rank");
  }
  void reduce_scatter_sum(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                          stream_t) override {
    check_slices(ts, bounds, "reduce_scatter_sum");
  }
  void all_gather_slices(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                         stream_t) override {
    check_slices(ts, bounds, "all_gather_slices");
  }
  void all_reduce_check(int* found_inf, double* sum, stream_t) override {
    MIXPREC_CHECK(found_inf != nullptr && sum != nullptr, "local all_reduce_check: found_inf = ",
                  static_cast<const void*>(found_inf), ", sum = ", static_cast<const void*>(sum), "; neither may be null");
  }
  void barrier() override {}
  [[noreturn]] void abort(int code) noexcept override { std::_Exit(code); }

 private:
  Device device_;
};

/// Runs `body` (the training) and, if it throws, prints "mixprec: rank R of
/// W: <what>; ending every rank" to stderr and aborts the job through
/// `comm`, so that no other rank waits in a collective for this one. A
/// trainer's main wraps its work in it.
template <class F>
int run_or_abort(Communicator& comm, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mixprec: rank %d of %d: %s; ending every rank\n", comm.rank(), comm.size(), e.what());
  } catch (...) {
    std::fprintf(stderr, "mixprec: rank %d of %d: an exception that is not a std::exception; ending every rank\n",
                 comm.rank(), comm.size());
  }
  std::fflush(stderr);
  comm.abort(1);
  return 1;  // not reached (abort() does not return; a virtual call hides that from the compiler)
}

}  // namespace dist
MIXPREC_NAMESPACE_END
