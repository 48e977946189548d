// SPDX-License-Identifier: Apache-2.0
// NcclCommunicator: data-parallel collectives over NCCL for tensors in GPU
// memory, one rank per GPU. Needs <nccl.h> and the CUDA runtime: link the
// CMake target mixprec::nccl.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/dist/communicator.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

/// One rank of a NCCL communicator of `size` ranks, on `device`. Every
/// rank passes the same `id`, made by one of them with make_id() and handed
/// to the others by whatever starts the job (MPI's broadcast:
/// dist/nccl_mpi.hpp). Collectives are queued on the caller's stream and
/// never wait on the host, so they can be captured in a CUDA graph.
///
/// Same bits on every rank: NCCL's ring all-reduce reduces each chunk once
/// and then copies it to every rank, its tree reduces up and broadcasts
/// down; neither rounds on one rank what another rounds differently (NCCL
/// does not promise it; the tests check it). 16-bit sums are NCCL's, in the
/// type (ncclFloat16, ncclBfloat16).
///
/// Failure: abort() calls ncclCommAbort and ends the process; the
/// destructor does so when an exception is unwinding past it. NCCL has no
/// time-out of its own on a collective: set_timeout() adds a watchdog that
/// watches an event recorded after each collective (outside graph
/// captures; watch_stream() for a replay) and NCCL's asynchronous errors,
/// and ends the rank (ncclCommAbort first) when one fires.
class NcclCommunicator final : public Communicator {
 public:
  /// A unique id for a new communicator (on one rank only).
  static ncclUniqueId make_id() {
    ncclUniqueId id;
    check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    return id;
  }

  NcclCommunicator(const ncclUniqueId& id, int rank, int size, Device device, int local_rank = -1,
                   int local_size = -1)
      : uncaught_(std::uncaught_exceptions()),
        rank_(rank),
        size_(size),
        local_rank_(local_rank < 0 ? rank : local_rank),
        local_size_(local_size < 0 ? size : local_size),
        device_(device) {
    MIXPREC_CHECK(size > 0 && rank >= 0 && rank < size, "NcclCommunicator: rank = ", rank, ", size = ", size,
                  "; must be 0 <= rank < size");
    MIXPREC_CHECK(device.is_cuda(), "NcclCommunicator: device = ", device, ", must be a CUDA device");
    mixprec::detail::DeviceGuard guard(device);
    check(ncclCommInitRank(&comm_, size, id, rank), "ncclCommInitRank");
  }

  ~NcclCommunicator() override {
    stop_watchdog();
    if (comm_ == nullptr) return;
    if (std::uncaught_exceptions() > uncaught_) abort(1);
    (void)ncclCommDestroy(comm_);
  }

  const char* backend() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  Device device() const override { return device_; }
  ncclComm_t comm() const { return comm_; }

  void all_reduce_sum(const TensorRef& t, stream_t stream = nullptr) override {
    check_reducible(t, "all_reduce_sum");
    if (t.numel() == 0) return;
    void* p = const_cast<void*>(t.data());
    mixprec::detail::DeviceGuard guard(device_);
    check(ncclAllReduce(p, p, static_cast<std::size_t>(t.numel()), type_of(t.dtype()), ncclSum, comm_,
                        reinterpret_cast<cudaStream_t>(stream)),
          "ncclAllReduce (all_reduce_sum)");
    watch_stream(stream, "all_reduce_sum");
  }

  /// ZeRO-1's reduce-scatter: for every piece of a tensor in rank k's
  /// slice, an ncclReduce (sum, in the type) to rank k, all of them grouped
  /// (NCCL runs a group as one launch; a list of more than kMaxGroupOps
  /// pieces takes several groups). Uneven slices and mixed dtypes need no
  /// padding or packing: ncclReduceScatter would need equal counts on every
  /// rank and one buffer. Each piece crosses the ranks once, as in a
  /// reduce-scatter. With 2 ranks the sums are the all-reduce's bits (a + b);
  /// with more, NCCL's reduce may add in another order than its all-reduce.
  void reduce_scatter_sum(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                          stream_t stream = nullptr) override {
    check_slices(ts, bounds, "reduce_scatter_sum");
    by_pieces(ts, bounds, true, stream);
    watch_stream(stream, "reduce_scatter_sum");
  }

  /// ZeRO-1's all-gather: an ncclBroadcast from rank k of every piece in
  /// its slice, grouped as reduce_scatter_sum's.
  void all_gather_slices(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds,
                         stream_t stream = nullptr) override {
    check_slices(ts, bounds, "all_gather_slices");
    by_pieces(ts, bounds, false, stream);
    watch_stream(stream, "all_gather_slices");
  }

  /// Two all-reduces in one group (one launch): the flag's maximum (int32)
  /// and the sum of the double. NCCL's all-reduce gives every rank the same
  /// bits (see the class comment); the order of the ranks' additions is
  /// NCCL's.
  void all_reduce_check(int* found_inf, double* sum, stream_t stream = nullptr) override {
    MIXPREC_CHECK(found_inf != nullptr && sum != nullptr, "nccl all_reduce_check: found_inf = ",
                  static_cast<const void*>(found_inf), ", sum = ", static_cast<const void*>(sum),
                  "; neither may be null");
    mixprec::detail::DeviceGuard guard(device_);
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    check(ncclGroupStart(), "ncclGroupStart (all_reduce_check)");
    const ncclResult_t a = ncclAllReduce(found_inf, found_inf, 1, ncclInt32, ncclMax, comm_, s);
    const ncclResult_t b = a == ncclSuccess ? ncclAllReduce(sum, sum, 1, ncclFloat64, ncclSum, comm_, s) : a;
    const ncclResult_t e = ncclGroupEnd();
    check(b, "ncclAllReduce (all_reduce_check)");
    check(e, "ncclGroupEnd (all_reduce_check)");
    watch_stream(stream, "all_reduce_check");
  }

  /// NCCL documents at most 2048 operations between ncclGroupStart and
  /// ncclGroupEnd; a longer list of pieces is cut into groups of this many.
  static constexpr int kMaxGroupOps = 1024;

  void broadcast(void* data, std::size_t bytes, int root, stream_t stream = nullptr) override {
    MIXPREC_CHECK(root >= 0 && root < size_, "nccl broadcast: root = ", root, ", there are ", size_, " ranks");
    mixprec::detail::DeviceGuard guard(device_);
    check(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, reinterpret_cast<cudaStream_t>(stream)),
          "ncclBroadcast");
    watch_stream(stream, "broadcast");
  }

  /// An all-reduce of one int on the default stream, then a wait for it:
  /// every rank has queued everything before its barrier() by then.
  void barrier() override {
    const Watched watched(watchdog(), "barrier");
    mixprec::detail::DeviceGuard guard(device_);
    int* one = nullptr;
    MIXPREC_CUDA_CHECK(cudaMalloc(&one, sizeof(int)));
    const ncclResult_t r = ncclAllReduce(one, one, 1, ncclInt32, ncclSum, comm_, nullptr);
    const cudaError_t s = cudaDeviceSynchronize();
    (void)cudaFree(one);
    check(r, "ncclAllReduce (barrier)");
    MIXPREC_CUDA_CHECK(s);
  }

  [[noreturn]] void abort(int code) noexcept override {
    if (comm_ != nullptr) (void)ncclCommAbort(comm_);
    std::_Exit(code);
  }

  /// Under set_timeout(): the work queued on `stream` so far must finish
  /// within the time-out (an event recorded now, watched). For a replayed
  /// CUDA graph, whose collectives were captured unwatched: call it after
  /// each replay. Nothing without a time-out, or while `stream` captures.
  void watch_stream(stream_t stream, const char* what) {
    Watchdog* w = watchdog();
    if (w == nullptr) return;
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    MIXPREC_CUDA_CHECK(cudaStreamIsCapturing(s, &status));
    if (status != cudaStreamCaptureStatusNone) return;
    mixprec::detail::DeviceGuard guard(device_);
    // An event of the pool (one a collective in flight; the watchdog drops
    // it once it has completed, and it goes back to the pool).
    cudaEvent_t event = events_->take();
    if (event == nullptr) MIXPREC_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    const std::shared_ptr<CUevent_st> owned(event, [pool = events_](cudaEvent_t e) { pool->give(e); });
    MIXPREC_CUDA_CHECK(cudaEventRecord(event, s));
    w->watch(what, [owned] { return cudaEventQuery(owned.get()) != cudaErrorNotReady; });
  }

 protected:
  [[noreturn]] void timed_out() noexcept override {
    if (comm_ != nullptr) (void)ncclCommAbort(comm_);  // NCCL's way to stop a communicator from another thread
    std::_Exit(kTimeoutExit);
  }
  Watchdog::Health health() override {
    return [this]() -> std::string {
      ncclResult_t e = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &e) != ncclSuccess || e == ncclSuccess || e == ncclInProgress) return {};
      return std::string("NCCL reported an asynchronous error: ") + ncclGetErrorString(e);
    };
  }

 private:
  static ncclDataType_t type_of(DType t) {
    if (t == DType::float16) return ncclFloat16;
    if (t == DType::bfloat16) return ncclBfloat16;
    return ncclFloat32;
  }

  // Every piece of rank k's slice: reduced to rank k (sum) or broadcast
  // from it, in groups of at most kMaxGroupOps operations.
  void by_pieces(const std::vector<TensorRef>& ts, const std::vector<std::int64_t>& bounds, bool sum,
                 stream_t stream) {
    const detail::FlatSequence flat(ts);
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    const char* what = sum ? "ncclReduce (reduce_scatter_sum)" : "ncclBroadcast (all_gather_slices)";
    mixprec::detail::DeviceGuard guard(device_);
    int in_group = 0;
    ncclResult_t r = ncclSuccess;
    check(ncclGroupStart(), "ncclGroupStart");
    for (int k = 0; k < size_; ++k) {
      flat.for_each_piece(bounds[static_cast<std::size_t>(k)], bounds[static_cast<std::size_t>(k) + 1],
                          [&](std::size_t i, std::int64_t first, std::int64_t count) {
        if (r != ncclSuccess) return;
        if (in_group == kMaxGroupOps) {
          r = ncclGroupEnd();
          if (r == ncclSuccess) r = ncclGroupStart();
          if (r != ncclSuccess) return;
          in_group = 0;
        }
        const TensorRef& t = ts[i];
        char* p = static_cast<char*>(const_cast<void*>(t.data())) + first * static_cast<std::int64_t>(dtype_size(t.dtype()));
        const auto n = static_cast<std::size_t>(count);
        r = sum ? ncclReduce(p, p, n, type_of(t.dtype()), ncclSum, k, comm_, s)
                : ncclBroadcast(p, p, n, type_of(t.dtype()), k, comm_, s);
        ++in_group;
      });
    }
    const ncclResult_t e = ncclGroupEnd();  // closes the group also after a failure
    check(r, what);
    check(e, "ncclGroupEnd");
  }

  static void check(ncclResult_t r, const char* call) {
    if (r == ncclSuccess) return;
    mixprec::detail::throw_error("NcclCommunicator: ", call, " failed: ", ncclGetErrorString(r), " (",
                                 static_cast<int>(r), ")");
  }

  // watch_stream's events, reused; shared with the watchdog's entries,
  // which may outlive this object by a moment.
  struct EventPool {
    std::mutex mutex;
    std::vector<cudaEvent_t> free;
    cudaEvent_t take() {
      const std::lock_guard<std::mutex> lock(mutex);
      if (free.empty()) return nullptr;
      const cudaEvent_t e = free.back();
      free.pop_back();
      return e;
    }
    void give(cudaEvent_t e) {
      const std::lock_guard<std::mutex> lock(mutex);
      free.push_back(e);
    }
    ~EventPool() {
      for (cudaEvent_t e : free) (void)cudaEventDestroy(e);
    }
  };

  int uncaught_;
  int rank_, size_, local_rank_, local_size_;
  Device device_;
  ncclComm_t comm_ = nullptr;
  std::shared_ptr<EventPool> events_ = std::make_shared<EventPool>();
};

}  // namespace dist
MIXPREC_NAMESPACE_END
