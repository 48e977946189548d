// SPDX-License-Identifier: Apache-2.0
// What docs/checkpoints.md's safetensors example takes as given: a layer's
// fp16 weights and fp32 biases in host vectors.
#include <vector>

#include <mixprec/mixprec.hpp>

std::vector<mixprec::half> weights;  // 256 x 784
std::vector<float> bias;             // 256
