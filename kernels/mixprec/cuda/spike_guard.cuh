// SPDX-License-Identifier: Apache-2.0
// The spike guard's two one-thread kernels (amp/spike_guard.hpp): the
// iteration's decision from the loss and the global gradient norm, and the
// flag one optimizer's step reads. No host synchronisation: a step with the
// guard can be captured in a CUDA graph.
#pragma once

#include "mixprec/amp/device_kernels.hpp"
#include "mixprec/amp/spike_guard.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

namespace detail {

// The norm as GradScaler::grad_norm computes it on the host: the sums of
// squares added in optimizer order, sqrt in double, times the float inverse
// scale, rounded to float; then the host-device rule.
__global__ inline void spike_guard_decide_kernel(amp::SpikeGuardState* s, double* window, amp::SpikeGuardPolicy p,
                                                 amp::GuardDecideInputs in) {
  bool any_inf = false;
  double total = 0.0;
  for (int i = 0; i < in.count; ++i) {
    any_inf = any_inf || *in.found_inf[i] != 0;
    total = __dadd_rn(total, *in.total_sum_squares[i]);
  }
  const float inv_scale = static_cast<float>(1.0 / (static_cast<double>(*in.scale) * in.grad_divisor));
  const float norm = static_cast<float>(__dmul_rn(::sqrt(total), static_cast<double>(inv_scale)));
  const double loss = in.loss != nullptr ? static_cast<double>(*in.loss) : __longlong_as_double(0x7ff8000000000000LL);
  amp::spike_guard_step(*s, window, p, loss, static_cast<double>(norm), any_inf);
}

__global__ inline void spike_guard_combine_kernel(const amp::SpikeGuardState* s, const int* found_inf, int* combined,
                                                  int* any_inf) {
  const int f = *found_inf;
  *combined = (f != 0 || s->skip != 0) ? 1 : 0;
  if (f != 0) *any_inf = 1;
}

}  // namespace detail

/// One launch of the decision, asynchronous on `stream`.
inline void launch_spike_guard_decide(amp::SpikeGuardState* s, double* window, const amp::SpikeGuardPolicy& p,
                                      const amp::GuardDecideInputs& in, cudaStream_t stream) {
  detail::spike_guard_decide_kernel<<<1, 1, 0, stream>>>(s, window, p, in);
  MIXPREC_CUDA_CHECK_LAUNCH("spike_guard_decide_kernel");
}

/// One launch of the combine, asynchronous on `stream`.
inline void launch_spike_guard_combine(const amp::SpikeGuardState* s, const int* found_inf, int* combined,
                                       int* any_inf, cudaStream_t stream) {
  detail::spike_guard_combine_kernel<<<1, 1, 0, stream>>>(s, found_inf, combined, any_inf);
  MIXPREC_CUDA_CHECK_LAUNCH("spike_guard_combine_kernel");
}

}  // namespace cuda
MIXPREC_NAMESPACE_END
