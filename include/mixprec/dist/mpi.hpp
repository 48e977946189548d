// SPDX-License-Identifier: Apache-2.0
// MpiCommunicator: data-parallel collectives over MPI for tensors in host
// memory (Open MPI, MPICH: any MPI-3 library). Needs <mpi.h>: link the
// CMake target mixprec::mpi.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "mixprec/dist/communicator.hpp"

namespace mixprec::dist {

namespace detail {

// Pairwise sums of 16-bit values for MPI_Reduce: in float, rounded to the
// type (the sum of two such values rounds once; what NCCL's half sum does).
template <class T>
void sum16(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

}  // namespace detail

/// Ranks of an MPI communicator (a duplicate of `comm`, MPI_COMM_WORLD by
/// default). Initialises MPI unless the program already did, and then
/// finalises it when
/// destroyed (keep it alive as long as any other communicator of the
/// program). Collectives may come from any thread, one at a time
/// (MPI_THREAD_SERIALIZED); they block and act on host tensors.
///
/// Same bits on every rank: all_reduce_sum is MPI_Reduce to rank 0 and
/// MPI_Bcast from it, so every rank holds rank 0's bits by construction,
/// whatever algorithm the library picks for a user-defined 16-bit operation
/// (the standard requires identical results of an MPI_Allreduce; this does
/// not depend on each library getting that right). The order of the sum is
/// the MPI library's, fixed for a given number of ranks and message size,
/// so a run repeats its bits; it differs from a one-process sum (see
/// docs/distributed.md).
///
/// Failure: MPI has no timeouts. A rank that throws past its
/// MpiCommunicator (the destructor runs during the unwinding) calls
/// MPI_Abort, and mpirun ends every rank with that rank's error; a rank
/// that exits without finalising is noticed by mpirun, which ends the job.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) : uncaught_(std::uncaught_exceptions()) {
    int initialised = 0;
    check(MPI_Initialized(&initialised), "MPI_Initialized");
    if (!initialised) {
      int provided = 0;
      check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
      owns_init_ = true;
      MIXPREC_CHECK(provided >= MPI_THREAD_SERIALIZED, "MpiCommunicator: the MPI library provides thread level ",
                    provided, ", below MPI_THREAD_SERIALIZED (collectives from any one thread at a time)");
    }
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    // Errors come back as codes (thrown as mixprec::Error), not the default
    // abort with no word of which call.
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    MPI_Comm node = MPI_COMM_NULL;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
    check(MPI_Comm_rank(node, &local_rank_), "MPI_Comm_rank(node)");
    check(MPI_Comm_size(node, &local_size_), "MPI_Comm_size(node)");
    MPI_Comm_free(&node);
    check(MPI_Op_create(&detail::sum16<half>, 1, &sum_half_), "MPI_Op_create");
    check(MPI_Op_create(&detail::sum16<bfloat16>, 1, &sum_bf16_), "MPI_Op_create");
  }

  /// Never throws. During an exception's unwinding, aborts the job (the
  /// other ranks would wait for this one in their next collective).
  ~MpiCommunicator() override {
    if (std::uncaught_exceptions() > uncaught_) abort(1);
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (finalised) return;
    MPI_Op_free(&sum_half_);
    MPI_Op_free(&sum_bf16_);
    MPI_Comm_free(&comm_);
    if (owns_init_) MPI_Finalize();
  }

  const char* backend() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  Device device() const override { return Device::cpu(); }
  /// The MPI communicator the collectives use (a duplicate of the one given).
  MPI_Comm comm() const { return comm_; }

  void all_reduce_sum(const TensorRef& t, stream_t = nullptr) override {
    check_reducible(t, "all_reduce_sum");
    MPI_Datatype type = MPI_FLOAT;
    MPI_Op op = MPI_SUM;
    switch (t.dtype()) {
      case DType::float32:
        break;
      case DType::float16:
        type = MPI_UINT16_T;
        op = sum_half_;
        break;
      case DType::bfloat16:
        type = MPI_UINT16_T;
        op = sum_bf16_;
        break;
    }
    const std::size_t elem = dtype_size(t.dtype());
    char* data = static_cast<char*>(const_cast<void*>(t.data()));
    // MPI counts are int: pieces of at most 2^30 elements.
    constexpr std::int64_t piece = std::int64_t{1} << 30;
    for (std::int64_t at = 0; at < t.numel(); at += piece) {
      const int n = static_cast<int>(std::min(piece, t.numel() - at));
      void* p = data + static_cast<std::size_t>(at) * elem;
      check(MPI_Reduce(rank_ == 0 ? MPI_IN_PLACE : p, rank_ == 0 ? p : nullptr, n, type, op, 0, comm_),
            "MPI_Reduce (all_reduce_sum)");
      check(MPI_Bcast(p, n, type, 0, comm_), "MPI_Bcast (all_reduce_sum)");
    }
  }

  void broadcast(void* data, std::size_t bytes, int root, stream_t = nullptr) override {
    MIXPREC_CHECK(root >= 0 && root < size_, "mpi broadcast: root = ", root, ", there are ", size_, " ranks");
    constexpr std::size_t piece = std::size_t{1} << 30;
    for (std::size_t at = 0; at < bytes; at += piece) {
      check(MPI_Bcast(static_cast<char*>(data) + at, static_cast<int>(std::min(piece, bytes - at)), MPI_BYTE, root,
                      comm_),
            "MPI_Bcast");
    }
  }

  void all_gather(void* data, const std::vector<std::size_t>& bytes, stream_t = nullptr) override {
    MIXPREC_CHECK(static_cast<int>(bytes.size()) == size_, "mpi all_gather: ", bytes.size(), " pieces for ", size_,
                  " ranks");
    std::vector<int> counts(bytes.size()), displs(bytes.size());
    std::size_t at = 0;
    for (std::size_t r = 0; r < bytes.size(); ++r) {
      MIXPREC_CHECK(bytes[r] <= static_cast<std::size_t>(std::numeric_limits<int>::max()) &&
                        at <= static_cast<std::size_t>(std::numeric_limits<int>::max()),
                    "mpi all_gather: piece ", r, " of ", bytes[r], " bytes at ", at, " is beyond MPI's int counts");
      counts[r] = static_cast<int>(bytes[r]);
      displs[r] = static_cast<int>(at);
      at += bytes[r];
    }
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, counts.data(), displs.data(), MPI_BYTE, comm_),
          "MPI_Allgatherv (all_gather)");
  }

  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }

  [[noreturn]] void abort(int code) noexcept override {
    MPI_Abort(comm_ != MPI_COMM_NULL ? comm_ : MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; if an MPI library did, this rank still ends
  }

 private:
  static void check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
    mixprec::detail::throw_error("MpiCommunicator: ", call, " failed: ", std::string(text, static_cast<std::size_t>(length)),
                                 " (code ", code, ")");
  }

  int uncaught_;
  bool owns_init_ = false;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  MPI_Op sum_half_ = MPI_OP_NULL, sum_bf16_ = MPI_OP_NULL;
};

}  // namespace mixprec::dist
