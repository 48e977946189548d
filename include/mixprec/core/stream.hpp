// SPDX-License-Identifier: Apache-2.0
// Owners of the CUDA objects a training loop needs from plain C++: a
// stream, an event, a captured graph and pinned host memory, with an
// asynchronous copy into it. With them a loop can run whole steps as one
// graph launch and read progress back without ever stalling the device.
// In a build without CUDA every constructor throws, naming the fix.
#pragma once

#include <cstddef>
#include <cstring>
#include <utility>

#include "mixprec/core/config.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"

// The CUDA handle types, declared as the CUDA headers declare them, so the
// classes below have one layout with or without those headers.
struct CUevent_st;
struct CUgraphExec_st;

MIXPREC_NAMESPACE_BEGIN

namespace detail {
inline void require_cuda_build(const char* what) {
  MIXPREC_CHECK(built_with_cuda(), what, ": mixprec was built without CUDA (link the mixprec::cuda target)");
}

/// Owns one CUDA handle: destroys it once, moves, never copies. Without
/// CUDA no handle is ever made, so nothing is destroyed.
template <class H, void (*Destroy)(H)>
class Owned {
 public:
  Owned() = default;
  ~Owned() { reset(); }
  Owned(Owned&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Owned& operator=(Owned&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;

  H get() const { return h_; }
  /// Destroys the current handle (if any) and takes `h`.
  void reset(H h = nullptr) noexcept {
    if (h_ != nullptr) Destroy(h_);
    h_ = h;
  }

 private:
  H h_ = nullptr;
};

#if MIXPREC_WITH_CUDA
inline void destroy_stream(stream_t s) { (void)cudaStreamDestroy(s); }
inline void destroy_event(::CUevent_st* e) { (void)cudaEventDestroy(e); }
inline void destroy_exec(::CUgraphExec_st* g) { (void)cudaGraphExecDestroy(g); }
#else
inline void destroy_stream(stream_t) {}
inline void destroy_event(::CUevent_st*) {}
inline void destroy_exec(::CUgraphExec_st*) {}
#endif
}  // namespace detail

/// An owned, non-blocking CUDA stream on `device` (it does not wait for the
/// legacy default stream). Move-only.
class Stream {
 public:
  explicit Stream(Device device = Device::cuda(0)) : device_(device) {
    detail::require_cuda_build("Stream");
    MIXPREC_CHECK(device.is_cuda(), "Stream: device = ", device, ", must be a CUDA device");
    detail::require_usable(device, "Stream");
#if MIXPREC_WITH_CUDA
    detail::DeviceGuard guard(device);
    cudaStream_t s = nullptr;
    MIXPREC_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    stream_.reset(s);
#endif
  }

  stream_t get() const { return stream_.get(); }
  Device device() const { return device_; }
  /// Waits for everything queued on the stream.
  void synchronize() const {
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
#endif
  }

 private:
  Device device_;
  detail::Owned<stream_t, detail::destroy_stream> stream_;
};

/// An owned CUDA event with timing. Move-only.
class Event {
 public:
  explicit Event(Device device = Device::cuda(0)) {
    detail::require_cuda_build("Event");
    MIXPREC_CHECK(device.is_cuda(), "Event: device = ", device, ", must be a CUDA device");
    detail::require_usable(device, "Event");
#if MIXPREC_WITH_CUDA
    detail::DeviceGuard guard(device);
    cudaEvent_t e = nullptr;
    MIXPREC_CUDA_CHECK(cudaEventCreate(&e));
    event_.reset(e);
#endif
  }

  /// Marks the point reached by the work queued on `stream` so far.
  void record(stream_t stream) {
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaEventRecord(event_.get(), stream));
#else
    (void)stream;
#endif
  }
  /// Makes the work queued on `stream` from now on wait, on the device, for
  /// the recorded point (cudaStreamWaitEvent; the host does not wait). In a
  /// graph capture this is how a second stream forks from and joins the
  /// captured one.
  void make_wait(stream_t stream) const {
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaStreamWaitEvent(stream, event_.get(), 0));
#else
    (void)stream;
#endif
  }
  /// Whether the device has passed the recorded point (never blocks).
  bool ready() const {
#if MIXPREC_WITH_CUDA
    const cudaError_t s = cudaEventQuery(event_.get());
    if (s == cudaErrorNotReady) return false;
    MIXPREC_CUDA_CHECK(s);
#endif
    return true;
  }
  /// Blocks the host until the device has passed the recorded point.
  void synchronize() const {
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaEventSynchronize(event_.get()));
#endif
  }
  /// Milliseconds from `start` to this event (both recorded and reached).
  float elapsed_ms(const Event& start) const {
    float ms = 0;
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_.get(), event_.get()));
#else
    (void)start;
#endif
    return ms;
  }

 private:
  detail::Owned<::CUevent_st*, detail::destroy_event> event_;
};

/// A CUDA graph: the work some code queues on a stream, captured once and
/// replayed with one launch. Replays reuse every device address the capture
/// saw, so the buffers, optimizers and scalers it used must stay alive and
/// in place. Capture is in global mode: a call that would synchronise the
/// device (a host read, a cudaMalloc) fails the capture, and capture()
/// throws with CUDA's reason. Make everything (buffers, optimizer state,
/// cuBLASLt plans) by running the code once before capturing it. Move-only.
class Graph {
 public:
  /// Captures what `body()` queues on `stream` (which must not be the
  /// legacy default stream) and, on success, replaces any earlier capture.
  /// If body or the capture fails, the error propagates, the earlier graph
  /// is kept, the stream is usable and CUDA's last-error state is clear.
  /// Host-side effects of body() (a scaler's record that a step was made,
  /// say) are not undone: after a failed capture, start the iteration anew.
  template <class F>
  void capture(stream_t stream, F&& body) {
    detail::require_cuda_build("Graph::capture");
    MIXPREC_CHECK(stream != nullptr, "Graph::capture: stream = null (the legacy default stream cannot be captured; "
                                     "use a mixprec::Stream)");
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph);  // leaves the stream usable
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      throw;
    }
    const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = ended == cudaSuccess ? cudaGraphInstantiate(&exec, graph, 0) : ended;
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    if (made != cudaSuccess) {
      (void)cudaGetLastError();  // a failed capture would otherwise be blamed on the next launch
      detail::throw_cuda_error(made, ended != cudaSuccess ? "cudaStreamEndCapture" : "cudaGraphInstantiate",
                               __FILE__, __LINE__);
    }
    exec_.reset(exec);
#else
    (void)body;
#endif
  }
  bool empty() const { return exec_.get() == nullptr; }
  /// Queues one replay on `stream`.
  void replay(stream_t stream) const {
    MIXPREC_CHECK(!empty(), "Graph::replay: nothing captured");
#if MIXPREC_WITH_CUDA
    MIXPREC_CUDA_CHECK(cudaGraphLaunch(exec_.get(), stream));
#else
    (void)stream;
#endif
  }

 private:
  detail::Owned<::CUgraphExec_st*, detail::destroy_exec> exec_;
};

/// Page-locked host memory: the target of copy_to_host_async, so the copy
/// overlaps the device's work. Zero-initialised. Move-only.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t bytes) : bytes_(bytes) {
    detail::require_cuda_build("PinnedBuffer");
#if MIXPREC_WITH_CUDA
    if (bytes == 0) return;
    MIXPREC_CUDA_CHECK(cudaMallocHost(&data_, bytes));
    std::memset(data_, 0, bytes);
#endif
  }
  ~PinnedBuffer() { reset(); }
  PinnedBuffer(PinnedBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() { return data_; }
  const void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void reset() noexcept {
#if MIXPREC_WITH_CUDA
    // Frees only after the current device is idle: no copy into it is in
    // flight. (So do not destroy one while another thread captures.)
    if (data_ != nullptr) {
      (void)cudaDeviceSynchronize();
      (void)cudaFreeHost(data_);
    }
#endif
    data_ = nullptr;
    bytes_ = 0;
  }
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Queues a copy of `bytes` from device memory into `dst` at `offset` and
/// returns at once; read dst after an Event recorded behind it is ready.
inline void copy_to_host_async(PinnedBuffer& dst, std::size_t offset, const void* src, std::size_t bytes,
                               stream_t stream) {
  MIXPREC_CHECK(offset <= dst.bytes() && bytes <= dst.bytes() - offset, "copy_to_host_async: bytes = ", bytes,
                " at offset = ", offset, " overrun the pinned buffer of ", dst.bytes(), " bytes");
#if MIXPREC_WITH_CUDA
  if (bytes != 0) {
    MIXPREC_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst.data()) + offset, src, bytes,
                                       cudaMemcpyDeviceToHost, stream));
  }
#else
  (void)src;
  (void)stream;
#endif
}

MIXPREC_NAMESPACE_END  // namespace mixprec
