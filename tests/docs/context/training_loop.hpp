// SPDX-License-Identifier: Apache-2.0
// What docs/grad-scaler.md's training loop takes as given: the parameters
// (as built in docs/optimizers.md), the trainer's forward, loss and backward.
#include <vector>

#include <mixprec/mixprec.hpp>

using mixprec::DType;
std::vector<mixprec::optim::Param> params;  // {name, weight view, gradient view} each
float loss = 0;
void forward();
void backward(float loss_seed);  // seeded with loss * scale
