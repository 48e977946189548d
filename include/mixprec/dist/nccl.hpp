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
#include <string>

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
    ncclDataType_t type = ncclFloat32;
    if (t.dtype() == DType::float16) type = ncclFloat16;
    if (t.dtype() == DType::bfloat16) type = ncclBfloat16;
    void* p = const_cast<void*>(t.data());
    mixprec::detail::DeviceGuard guard(device_);
    check(ncclAllReduce(p, p, static_cast<std::size_t>(t.numel()), type, ncclSum, comm_,
                        reinterpret_cast<cudaStream_t>(stream)),
          "ncclAllReduce (all_reduce_sum)");
    watch_stream(stream, "all_reduce_sum");
  }

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
    cudaEvent_t event = nullptr;
    MIXPREC_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    const std::shared_ptr<CUevent_st> owned(event, [](cudaEvent_t e) { (void)cudaEventDestroy(e); });
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
  static void check(ncclResult_t r, const char* call) {
    if (r == ncclSuccess) return;
    mixprec::detail::throw_error("NcclCommunicator: ", call, " failed: ", ncclGetErrorString(r), " (",
                                 static_cast<int>(r), ")");
  }

  int uncaught_;
  int rank_, size_, local_rank_, local_size_;
  Device device_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace dist
MIXPREC_NAMESPACE_END
