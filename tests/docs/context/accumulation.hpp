// SPDX-License-Identifier: Apache-2.0
// What docs/grad-scaler.md's accumulation loop takes as given: the optimizer
// and scaler of the training loop, the gradient buffer (one here, as a
// Tensor; a view of yours works the same), the number of micro-batches, and
// the trainer's forward and backward (which adds into the gradient).
#include <mixprec/mixprec.hpp>

extern mixprec::optim::AdamW opt;
extern mixprec::amp::GradScaler scaler;
extern mixprec::Tensor<mixprec::half> grad;
const int k = 4;          // micro-batches per optimizer step
const int steps = 1000;
float loss = 0;
void forward(int micro_batch);
void backward_adding_into(mixprec::Tensor<mixprec::half>& grad, float loss_seed);
