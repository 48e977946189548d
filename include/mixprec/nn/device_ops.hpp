// SPDX-License-Identifier: Apache-2.0
// The layers' seam to their CUDA kernels, as optim/device_backend.hpp is the
// optimizers': an interface that kernels/mixprec/cuda/backend.cuh implements
// and installs, so layers on a device run from .cpp files compiled by g++.
// Pointers are device pointers to elements of `dtype` unless said otherwise.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/functional.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

/// A 2-D convolution, NCHW: x [n, c, h, w], weight [k, c, r, s], y [n, k, p, q].
struct ConvShape {
  std::int64_t n, c, h, w, k, r, s, stride, pad, p, q;
};
/// A 2-D max pooling, NCHW: x [n, c, h, w] -> y [n, c, p, q], square window.
struct PoolShape {
  std::int64_t n, c, h, w, window, stride, p, q;
};

/// How the device GEMMs (Linear layers, cuBLASLt) pick their algorithm. The
/// choice is made once per GEMM shape, at its first call, and kept: every
/// later call and every graph replay of that shape runs the same algorithm,
/// so within a run the same inputs give the same bits. Either way, for fp16
/// and bf16 only algorithms whose split-K partial sums stay in fp32 are
/// considered.
enum class GemmAlgorithms {
  /// cuBLASLt's heuristic's first answer (the default). No device work to
  /// choose; the same choice in every run on the same GPU (architecture and
  /// number of SMs) with the same cuBLAS and equally aligned buffers, so
  /// the same bits from run to run.
  heuristic,
  /// cuBLASLt's heuristic candidates (up to 16) timed on the shape's
  /// own operands at its first call, which therefore waits for the stream
  /// (not inside a CUDA graph capture: run one step eagerly first). A
  /// candidate replaces the heuristic's first only when at least 3% faster
  /// (or when the first cannot run). Another algorithm sums in another
  /// order, and timings vary, so two runs may choose differently and their
  /// results then differ in the last bits; opt-in for that reason (as
  /// PyTorch's cudnn.benchmark is).
  timed,
};

/// One GEMM shape's plan (DeviceOps::gemm_plans): D[m, n] = op(A)[m, k] op(B)[k, n],
/// column-major, as cuBLASLt sees it.
struct GemmPlanInfo {
  DType dtype = DType::float32;
  std::int64_t m = 0, n = 0, k = 0;
  int epilogue = 0;    ///< the cublasLtEpilogue_t value
  int candidates = 0;  ///< algorithms the heuristic returned: 1 under `heuristic`
  int timed = 0;       ///< of those, timed (the ones that ran here); 0 under `heuristic`
  int chosen = 0;      ///< the kept one's rank in the heuristic's list (0: its first)
  double first_us = 0;    ///< timed: the heuristic's first, microseconds a call (0 if it could not run)
  double fastest_us = 0;  ///< timed: the fastest candidate
  double chosen_us = 0;   ///< timed: the kept one
  /// The kept algorithm, as cuBLASLt describes it: its id, split-K count
  /// (1: none) and reduction scheme (cublasLtReductionScheme_t; 0: none).
  std::int32_t algo_id = 0, split_k = 1;
  std::uint32_t reduction_scheme = 0;
};

/// How a Linear layer's GEMMs fuse with its neighbours' (device path).
struct LinearFusion {
  /// Forward, the activation's aux output. GELU: the pre-activation, T,
  /// [batch, out] (ld = out, a multiple of 8). ReLU: null, or a bit mask
  /// (ld in bits, a multiple of 128) for the next layer's backward.
  void* aux = nullptr;
  std::int64_t aux_ld = 0;
  /// Backward: dy already holds dLoss/dz and the bias gradient is written
  /// (the next layer's input-gradient GEMM did both).
  bool dy_is_dz = false;
  /// Backward: the previous layer's activation, aux and bias gradient. The
  /// input-gradient GEMM then applies that activation's derivative and
  /// writes that bias gradient in its epilogue (cuBLASLt DRELU_BGRAD /
  /// DGELU_BGRAD), so dx is the previous layer's dLoss/dz.
  Activation prev_act = Activation::none;
  const void* prev_aux = nullptr;
  std::int64_t prev_aux_ld = 0;
  void* prev_grad_bias = nullptr;
};

class DeviceOps {
 public:
  virtual ~DeviceOps() = default;

  /// y = act(conv(x, w) + bias) (bias may be null; act none or relu). fp32
  /// accumulation.
  virtual void conv2d_forward(DType dtype, const ConvShape& shape, const void* x, const void* w, const void* bias,
                              Activation act, void* y, stream_t stream) = 0;
  /// From dy: dz = dy * act'(y) (y the forward's output, read for relu
  /// only); grad_w, grad_bias (may be null) overwritten from dz; dx (may be
  /// null) = the input gradient.
  virtual void conv2d_backward(DType dtype, const ConvShape& shape, const void* x, const void* w, const void* y,
                               const void* dy, Activation act, void* dx, void* grad_w, void* grad_bias,
                               stream_t stream) = 0;
  virtual void maxpool2d_forward(DType dtype, const PoolShape& shape, const void* x, void* y, stream_t stream) = 0;
  virtual void maxpool2d_backward(DType dtype, const PoolShape& shape, const void* x, const void* y, const void* dy,
                                  void* dx, stream_t stream) = 0;

  /// y[b, o] = act(sum_i x[b, i] w[o, i] + bias[o]) (bias may be null),
  /// with the aux output of `f`. fp32 accumulation.
  virtual void linear_forward(DType dtype, const void* x, const void* w, const void* bias, void* y,
                              std::int64_t batch, std::int64_t in, std::int64_t out, Activation act,
                              const LinearFusion& f, stream_t stream) = 0;
  /// From dy: dz = dy * act'(z) (GELU's z from f.aux, ReLU's sign from y)
  /// unless f.dy_is_dz; grad_w = dz^T x, grad_bias = sum over the batch of
  /// dz (may be null); dx = dz w (may be null), times the previous layer's
  /// activation derivative when f says so. Gradients are overwritten.
  virtual void linear_backward(DType dtype, const void* x, const void* w, const void* y, const void* dy, void* dx,
                               void* grad_w, void* grad_bias, std::int64_t batch, std::int64_t in,
                               std::int64_t out, Activation act, const LinearFusion& f, stream_t stream) = 0;
  /// dst[i] = src[i] converted from dtype `from` to dtype `to`, rounding to
  /// nearest even with the host's bits (core/convert.hpp), n elements; the
  /// boundary casts of a layer computing in another precision (Recast).
  virtual void convert(DType from, const void* src, DType to, void* dst, std::int64_t n, stream_t stream) = 0;
  /// y = act(x), n elements.
  virtual void activation_forward(DType dtype, Activation act, const void* x, void* y, std::int64_t n,
                                  stream_t stream) = 0;
  /// dx = dy * act'(x), n elements.
  virtual void activation_backward(DType dtype, Activation act, const void* x, const void* dy, void* dx,
                                   std::int64_t n, stream_t stream) = 0;
  /// Mean softmax cross-entropy of logits [batch, classes] against int32
  /// labels: *loss (device float) = the mean, dlogits = scale * dLoss/dlogits
  /// in the logits' dtype; *scale is read on the device. Labels out of range
  /// set *bad_label (device int) and contribute nothing.
  virtual void softmax_cross_entropy(DType dtype, const void* logits, const std::int32_t* labels,
                                     std::int64_t batch, std::int64_t classes, const float* scale, void* dlogits,
                                     float* loss, int* bad_label, stream_t stream) = 0;
  /// Mean squared error over n elements: *loss = mean((y - t)^2),
  /// dy = scale * 2 (y - t) / n.
  virtual void mse(DType dtype, const void* y, const void* target, std::int64_t n, const float* scale, void* dy,
                   float* loss, stream_t stream) = 0;

  /// One batch of a device-resident data set: for b < batch, row r =
  /// order[(*cursor * batch + b) % n]; copies `row_bytes` bytes from
  /// rows + r * row_bytes to x + b * row_bytes and labels[b] =
  /// row_labels[r] (both label pointers may be null); then *cursor += 1.
  virtual void gather_batch(const void* rows, std::size_t row_bytes, const std::int32_t* row_labels,
                            const std::int32_t* order, std::int64_t n, std::int64_t* cursor, std::int64_t batch,
                            void* x, std::int32_t* labels, stream_t stream) = 0;
  /// *sum += *value (device floats).
  virtual void accumulate(float* sum, const float* value, stream_t stream) = 0;
  /// *correct += the number of rows of logits [batch, classes] whose largest
  /// entry (the first one on ties; NaN and -inf never count as largest) is
  /// at the row's label.
  virtual void count_correct(DType dtype, const void* logits, const std::int32_t* labels, std::int64_t batch,
                             std::int64_t classes, std::int64_t* correct, stream_t stream) = 0;

  /// Sets how GEMM shapes met from now on choose their algorithm. Shapes
  /// already planned under another setting are planned again at their next
  /// call (graphs captured before keep what they captured).
  virtual void set_gemm_algorithms(GemmAlgorithms how) = 0;
  virtual GemmAlgorithms gemm_algorithms() const = 0;
  /// The GEMM shapes planned under the current setting, in shape order.
  virtual std::vector<GemmPlanInfo> gemm_plans() const = 0;
  /// Whether narrow Linear layers run mixprec's own kernels (set_narrow_linear).
  virtual void set_narrow_linear(bool on) = 0;
  virtual bool narrow_linear() const = 0;
};

}  // namespace nn
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace detail {
inline std::atomic<nn::DeviceOps*>& nn_device_ops_slot() {
  static std::atomic<nn::DeviceOps*> slot{nullptr};
  return slot;
}
/// The installed ops, or an error naming `what`, the device and the fix.
inline nn::DeviceOps& require_nn_device_ops(const char* what, Device device) {
  nn::DeviceOps* ops = nn_device_ops_slot().load();
  MIXPREC_CHECK(ops != nullptr, what, ": the layer is on ", device,
                " but no CUDA kernels are linked into this program; compile one .cu file that includes "
                "<mixprec/cuda/backend.cuh> (see docs/getting-started.md, \"GPU training from .cpp files\")");
  return *ops;
}
}  // namespace detail
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace nn {
/// Installs the kernels' implementation (backend.cuh does this for you).
inline void install_device_ops(DeviceOps* ops) { mixprec::detail::nn_device_ops_slot().store(ops); }
/// The installed ops (checked where a layer is made on a device).
inline DeviceOps& nn_device_ops() { return *mixprec::detail::nn_device_ops_slot().load(); }

/// Sets how the device GEMMs choose their algorithm (GemmAlgorithms) for
/// the process's installed kernels; call it before the first step, or
/// before a warm-up step that runs eagerly. Throws, changing nothing, when
/// `how` is not a GemmAlgorithms value or no CUDA kernels are linked in.
inline void set_gemm_algorithms(GemmAlgorithms how) {
  MIXPREC_CHECK(how == GemmAlgorithms::heuristic || how == GemmAlgorithms::timed,
                "set_gemm_algorithms: how = ", static_cast<int>(how),
                " is not a GemmAlgorithms value (heuristic = 0, timed = 1)");
  DeviceOps* ops = mixprec::detail::nn_device_ops_slot().load();
  MIXPREC_CHECK(ops != nullptr,
                "set_gemm_algorithms: no CUDA kernels are linked into this program; compile one .cu file that "
                "includes <mixprec/cuda/backend.cuh>");
  ops->set_gemm_algorithms(how);
}

/// Whether Linear layers of at most 16 outputs (a classifier's last layer)
/// run mixprec's own kernels on a device, for the forward (bias, and ReLU
/// when no mask is kept for the next layer) and the weight and bias
/// gradients, instead of cuBLASLt's GEMMs (off by default: their first form
/// measured slower than cuBLASLt on an H100, docs/layers.md; cuBLASLt always
/// takes such a layer's input gradient, and layers whose `in` is not a
/// multiple of 4). Both accumulate in fp32 and round to nearest into T; they
/// sum in different orders, so switching changes the last bits. Each keeps
/// its own bits from call to call and in graph replays. Calls made from now
/// on follow the setting (graphs captured before keep what they captured).
/// Throws, changing nothing, when no CUDA kernels are linked in.
inline void set_narrow_linear(bool on) {
  DeviceOps* ops = mixprec::detail::nn_device_ops_slot().load();
  MIXPREC_CHECK(ops != nullptr,
                "set_narrow_linear: no CUDA kernels are linked into this program; compile one .cu file that "
                "includes <mixprec/cuda/backend.cuh>");
  ops->set_narrow_linear(on);
}
}  // namespace nn
MIXPREC_NAMESPACE_END
