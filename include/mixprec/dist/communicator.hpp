// SPDX-License-Identifier: Apache-2.0
// Communicator: the collectives data parallelism needs, over an existing
// engine (MPI for host tensors, NCCL for device tensors; mixprec has no
// transport of its own), and the one-process communicator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/tensor_ref.hpp"

namespace mixprec::dist {

/// One process's view of a group of processes (ranks) that train one model
/// together, each on its own share of the batch. Collectives are called by
/// every rank in the same order with the same sizes (MPI's and NCCL's rule).
///
/// Numerics: every collective gives every rank the same bits (the engines
/// do not promise that for a plain all-reduce; the backends here arrange
/// it, see each one). 16-bit tensors are summed in their own type, as
/// PyTorch DDP does: each pairwise sum is computed in float and rounded to
/// the type, so an overflow of the sum is an inf like any other and the
/// step is skipped on every rank.
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

  /// In place: every element of `t` becomes the sum over the ranks of that
  /// element, the same bits on every rank. fp16, bf16 or fp32. Host
  /// communicators: blocking. Device communicators: queued on `stream`.
  virtual void all_reduce_sum(const TensorRef& t, stream_t stream = nullptr) = 0;
  /// In place: `bytes` bytes at `data` (on device()) take rank `root`'s value.
  virtual void broadcast(void* data, std::size_t bytes, int root, stream_t stream = nullptr) = 0;
  /// In place: `data` holds size() pieces back to back, piece r of
  /// `bytes[r]` bytes; afterwards every rank holds every rank's own piece
  /// (an all-gather; ZeRO-1's weights). MPI and one rank; NCCL: not yet.
  virtual void all_gather(void* data, const std::vector<std::size_t>& bytes, stream_t stream = nullptr) {
    (void)data;
    (void)bytes;
    (void)stream;
    mixprec::detail::throw_error(backend(), " all_gather: not in this backend yet");
  }
  /// Returns once every rank has called it (host-side; device
  /// communicators also wait for their streams' work queued so far).
  virtual void barrier() = 0;
  /// Ends every rank of the job now, with `code`: what a rank that cannot
  /// go on calls, so that no other rank waits for it forever.
  [[noreturn]] virtual void abort(int code) noexcept = 0;

 protected:
  void check_reducible(const TensorRef& t, const char* what) const {
    MIXPREC_CHECK(t.device() == device(), backend(), " ", what, ": the tensor is on ", t.device(),
                  ", this communicator reduces tensors on ", device());
    MIXPREC_CHECK(!t.read_only(), backend(), " ", what, ": the tensor is a read-only view");
  }
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

}  // namespace mixprec::dist
