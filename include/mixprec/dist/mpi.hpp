// SPDX-License-Identifier: Apache-2.0
// MpiCommunicator: data-parallel collectives over MPI for tensors in host
// memory (Open MPI, MPICH: any MPI-3 library). Needs <mpi.h>: link the
// CMake target mixprec::mpi.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "mixprec/dist/communicator.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

namespace detail {

// The owner's sum of W ranks' pieces, in rank order: piece j of `count`
// values of type T at in + j * stride (bytes) is rank j's. Accumulated in
// float; with own_type each partial sum is rounded to T (exact for float).
// The pieces are packed bytes of several dtypes: read through memcpy, as
// they need not be aligned for T.
template <class T>
void sum_in_rank_order(const unsigned char* in, std::size_t stride, int ranks, T* out, std::int64_t count,
                       Accumulation how) {
  constexpr std::int64_t kBlock = 1024;
  float acc[kBlock], v[kBlock];
  T x[kBlock];
  // Widening and rounding go through convert_n (F16C where the CPU has
  // it; the bits of to_float / from_float).
  for (std::int64_t at = 0; at < count; at += kBlock) {
    const std::int64_t m = std::min(kBlock, count - at);
    const auto n = static_cast<std::size_t>(m);
    const std::size_t bytes = n * sizeof(T), skip = static_cast<std::size_t>(at) * sizeof(T);
    std::memcpy(x, in + skip, bytes);
    convert_n(x, n, acc);
    for (int j = 1; j < ranks; ++j) {
      std::memcpy(x, in + static_cast<std::size_t>(j) * stride + skip, bytes);
      convert_n(x, n, v);
      for (std::size_t e = 0; e < n; ++e) acc[e] += v[e];
      if (how == Accumulation::own_type) {  // each partial sum rounded to T
        convert_n(acc, n, x);
        convert_n(x, n, acc);
      }
    }
    convert_n(acc, n, out + at);
  }
}

}  // namespace detail

/// Ranks of an MPI communicator (a duplicate of `comm`, MPI_COMM_WORLD by
/// default). Initialises MPI unless the program already did, and then
/// finalises it when destroyed (keep it alive as long as any other
/// communicator of the program). Collectives may come from any thread, one
/// at a time (MPI_THREAD_SERIALIZED); they block and act on host tensors.
///
/// The sums are ours, over MPI's data movement, so that their bits do not
/// depend on the algorithms an MPI library picks: every element has one
/// owner (the rank whose slice holds it, even_bounds() for all_reduce_sum),
/// every rank sends the owner its value (MPI_Alltoallv), the owner adds the
/// W values in rank order ((x0 + x1) + x2 ...; in float for 16-bit types
/// with Accumulation::float32, the default, or rounded to the type at each
/// addition with own_type), and all_reduce_sum then hands every slice to
/// every rank (MPI_Allgatherv). So every rank holds the same bits by
/// construction, a run repeats its bits whatever the MPI library, and an
/// element's sum does not depend on how the elements are sliced: ZeRO-1's
/// reduce_scatter_sum gives the bits all_reduce_sum gives. Each rank sends
/// and receives 2 (W - 1) / W times the tensor's bytes, as a ring
/// all-reduce does; the 16-bit values travel as 16 bits either way.
///
/// Failure: MPI has no timeouts (set_timeout() adds a watchdog that ends a
/// rank whose collective does not finish in time). A rank that throws past its
/// MpiCommunicator (the destructor runs during the unwinding) calls
/// MPI_Abort, and mpirun ends every rank with that rank's error; a rank
/// that exits without finalising is noticed by mpirun, which ends the job.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, Accumulation accumulation = Accumulation::float32)
      : uncaught_(std::uncaught_exceptions()), accumulation_(accumulation) {
    MIXPREC_CHECK(accumulation == Accumulation::float32 || accumulation == Accumulation::own_type,
                  "MpiCommunicator: accumulation = ", static_cast<int>(accumulation), " is not an Accumulation");
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
  }

  /// Never throws. During an exception's unwinding, aborts the job (the
  /// other ranks would wait for this one in their next collective).
  ~MpiCommunicator() override {
    stop_watchdog();
    if (std::uncaught_exceptions() > uncaught_) abort(1);
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (finalised) return;
    MPI_Comm_free(&comm_);
    if (owns_init_) MPI_Finalize();
  }

  const char* backend() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  Device device() const override { return Device::cpu(); }
  Accumulation accumulation() const override { return accumulation_; }
  /// The MPI communicator the collectives use (a duplicate of the one given).
  MPI_Comm comm() const { return comm_; }

  void all_reduce_sum(const TensorRef& t, stream_t = nullptr) override {
    check_reducible(t, "all_reduce_sum");
    const Watched watched(watchdog(), "all_reduce_sum");
    const std::vector<TensorRef> ts{t};
    const std::vector<std::int64_t> bounds = even_bounds(t.numel(), size_);
    exchange(ts, bounds, true, true);
  }

  void reduce_scatter_sum(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                          stream_t = nullptr) override {
    check_slices(ts, bounds, "reduce_scatter_sum");
    const Watched watched(watchdog(), "reduce_scatter_sum");
    exchange(ts, bounds, true, false);
  }

  void all_gather_slices(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                         stream_t = nullptr) override {
    check_slices(ts, bounds, "all_gather_slices");
    const Watched watched(watchdog(), "all_gather_slices");
    exchange(ts, bounds, false, true);
  }

  void broadcast(void* data, std::size_t bytes, int root, stream_t = nullptr) override {
    MIXPREC_CHECK(root >= 0 && root < size_, "mpi broadcast: root = ", root, ", there are ", size_, " ranks");
    const Watched watched(watchdog(), "broadcast");
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
    const Watched watched(watchdog(), "all_gather");
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, counts.data(), displs.data(), MPI_BYTE, comm_),
          "MPI_Allgatherv (all_gather)");
  }

  /// Host memory. Every rank's {flag, sum} gathered (16 bytes a rank), the
  /// flags or-ed and the sums added in rank order on every rank: the same
  /// bits everywhere, whatever algorithm MPI's reduction would pick.
  void all_reduce_check(int* found_inf, double* sum, stream_t = nullptr) override {
    MIXPREC_CHECK(found_inf != nullptr && sum != nullptr, "mpi all_reduce_check: found_inf = ",
                  static_cast<const void*>(found_inf), ", sum = ", static_cast<const void*>(sum),
                  "; neither may be null");
    std::vector<double> all(2 * static_cast<std::size_t>(size_));
    const double mine[2] = {*found_inf != 0 ? 1.0 : 0.0, *sum};
    {
      const Watched watched(watchdog(), "all_reduce_check");
      check(MPI_Allgather(mine, 2, MPI_DOUBLE, all.data(), 2, MPI_DOUBLE, comm_), "MPI_Allgather (all_reduce_check)");
    }
    int flag = 0;
    double total = 0;
    for (std::size_t k = 0; k < static_cast<std::size_t>(size_); ++k) {
      flag |= all[2 * k] != 0.0 ? 1 : 0;
      total += all[2 * k + 1];
    }
    *found_inf = flag;
    *sum = total;
  }

  void barrier() override {
    const Watched watched(watchdog(), "barrier");
    check(MPI_Barrier(comm_), "MPI_Barrier");
  }

  [[noreturn]] void abort(int code) noexcept override {
    MPI_Abort(comm_ != MPI_COMM_NULL ? comm_ : MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; if an MPI library did, this rank still ends
  }

 private:
  // Reduce-scatter (sum) and / or all-gather over the flat sequence `ts`
  // sliced by `bounds`, in rounds of at most kRound / W elements of each
  // slice (MPI's int counts, and bounded scratch memory).
  void exchange(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds, bool sum, bool gather) {
    if (size_ == 1) return;
    constexpr std::int64_t kRound = std::int64_t{1} << 26;  // elements over all slices: <= 256 MiB of fp32
    const detail::FlatSequence flat(ts);
    const auto w = static_cast<std::size_t>(size_), me = static_cast<std::size_t>(rank_);
    const std::int64_t per = std::max<std::int64_t>(1, kRound / size_);
    std::int64_t longest = 0;
    for (std::size_t k = 0; k < w; ++k) longest = std::max(longest, bounds[k + 1] - bounds[k]);
    std::vector<int> counts(w), displs(w), rcounts(w), rdispls(w);
    std::vector<std::int64_t> lo(w), hi(w);
    for (std::int64_t round = 0; round * per < longest; ++round) {
      std::size_t total = 0;
      for (std::size_t k = 0; k < w; ++k) {
        lo[k] = std::min(bounds[k] + round * per, bounds[k + 1]);
        hi[k] = std::min(lo[k] + per, bounds[k + 1]);
        counts[k] = static_cast<int>(flat.bytes(lo[k], hi[k]));
        displs[k] = static_cast<int>(total);
        total += static_cast<std::size_t>(counts[k]);
      }
      const std::size_t mine = static_cast<std::size_t>(counts[me]);
      if (sum) {
        // Every rank's values of each slice to its owner.
        send_.resize(total);
        for (std::size_t k = 0; k < w; ++k) pack(ts, flat, lo[k], hi[k], send_.data() + displs[k]);
        recv_.resize(mine * w);
        for (std::size_t j = 0; j < w; ++j) {
          rcounts[j] = static_cast<int>(mine);
          rdispls[j] = static_cast<int>(mine * j);
        }
        check(MPI_Alltoallv(send_.data(), counts.data(), displs.data(), MPI_BYTE, recv_.data(), rcounts.data(),
                            rdispls.data(), MPI_BYTE, comm_),
              "MPI_Alltoallv (the sum's values to each element's owner)");
        // The owner's sums, into its slice of the tensors.
        std::size_t at = 0;
        flat.for_each_piece(lo[me], hi[me], [&](std::size_t i, std::int64_t first, std::int64_t n) {
          ts[i].visit([&](auto view) {
            using T = typename decltype(view)::value_type;
            detail::sum_in_rank_order<T>(recv_.data() + at, mine, size_, const_cast<T*>(view.data()) + first, n,
                                         accumulation_);
            at += static_cast<std::size_t>(n) * sizeof(T);
          });
        });
      }
      if (gather) {
        send_.resize(total);
        pack(ts, flat, lo[me], hi[me], send_.data() + displs[me]);
        check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, send_.data(), counts.data(), displs.data(), MPI_BYTE,
                             comm_),
              "MPI_Allgatherv (every slice to every rank)");
        for (std::size_t k = 0; k < w; ++k) {
          if (k != me) unpack(ts, flat, lo[k], hi[k], send_.data() + displs[k]);
        }
      }
    }
  }

  static void pack(const std::vector<TensorRef>& ts, const detail::FlatSequence& flat, std::int64_t a, std::int64_t b,
                   unsigned char* to) {
    flat.for_each_piece(a, b, [&](std::size_t i, std::int64_t first, std::int64_t n) {
      const std::size_t e = dtype_size(ts[i].dtype()), bytes = static_cast<std::size_t>(n) * e;
      std::memcpy(to, static_cast<const unsigned char*>(ts[i].data()) + static_cast<std::size_t>(first) * e, bytes);
      to += bytes;
    });
  }
  static void unpack(const std::vector<TensorRef>& ts, const detail::FlatSequence& flat, std::int64_t a,
                     std::int64_t b, const unsigned char* from) {
    flat.for_each_piece(a, b, [&](std::size_t i, std::int64_t first, std::int64_t n) {
      const std::size_t e = dtype_size(ts[i].dtype()), bytes = static_cast<std::size_t>(n) * e;
      std::memcpy(static_cast<unsigned char*>(const_cast<void*>(ts[i].data())) + static_cast<std::size_t>(first) * e,
                  from, bytes);
      from += bytes;
    });
  }

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
  Accumulation accumulation_;
  std::vector<unsigned char> send_, recv_;  // scratch of the collectives (one at a time: SERIALIZED)
};

}  // namespace dist
MIXPREC_NAMESPACE_END
