// SPDX-License-Identifier: Apache-2.0
// What README.md's and docs/optimizers.md's first examples take as given: a
// trainer's own fp16 weight and gradient buffers, its loss and its backward.
#include <mixprec/mixprec.hpp>

mixprec::half* w_ptr = nullptr;  // fc.weight, 1024 x 784: the weights your forward reads
mixprec::half* g_ptr = nullptr;  // and the gradients your backward writes
mixprec::half *w1_ptr = nullptr, *g1_ptr = nullptr, *b1_ptr = nullptr, *gb1_ptr = nullptr;
float loss = 0;                  // this step's loss
void backward(float loss_seed);  // your backward pass, seeded with loss * scale
