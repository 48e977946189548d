// SPDX-License-Identifier: Apache-2.0
// What docs/monitor.md's examples take as given: the optimizer, the scaler's
// options, device and stream, the trainer's forward and backward (which
// return the loss in device memory).
#include <mixprec/mixprec.hpp>

namespace amp = mixprec::amp;
namespace monitor = mixprec::monitor;
extern mixprec::optim::AdamW opt;
amp::GradScalerOptions options;
extern const mixprec::Device device;  // cuda:0
mixprec::stream_t stream = nullptr;
const int steps = 1000;
const float* forward_and_backward(const float* loss_scale_on_device);  // the loss, on the device
