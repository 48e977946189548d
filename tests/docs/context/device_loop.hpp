// SPDX-License-Identifier: Apache-2.0
// What the GPU loops of docs/grad-scaler.md take as given: an optimizer over
// parameters on cuda:0, the scaler's options, a stream, and the trainer's
// forward and backward kernels, which read the loss scale from device memory.
#include <mixprec/mixprec.hpp>

namespace amp = mixprec::amp;
using mixprec::Device;
extern mixprec::optim::AdamW opt;
amp::GradScalerOptions options;
mixprec::stream_t stream = nullptr;
void forward_and_backward(const float* loss_scale_on_device);
