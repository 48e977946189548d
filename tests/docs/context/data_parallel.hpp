// SPDX-License-Identifier: Apache-2.0
// What docs/distributed.md's first program takes as given: the model's
// parameters (the same initial weights on every rank), this rank's share of
// the batch, the loss, and the forward and backward. Stand-ins that run: one
// fp16 parameter; the backward writes a constant gradient times the seed.
#include <vector>

#include <mixprec/mixprec.hpp>

inline mixprec::Tensor<mixprec::half> make_tensor(float value) {
  mixprec::Tensor<mixprec::half> t({256});
  mixprec::fill(t, value);
  return t;
}
mixprec::Tensor<mixprec::half> weight = make_tensor(0.5f), gradient = make_tensor(0.0f);
std::vector<mixprec::optim::Param> params = {{"w", weight, gradient}};
struct Batch {};
Batch my_share_of_the_batch;
float loss = 1.0f;
const int steps = 10;
inline void forward(const Batch&) {}
inline void backward(float loss_seed) { mixprec::fill(gradient, 1e-3f * loss_seed); }
