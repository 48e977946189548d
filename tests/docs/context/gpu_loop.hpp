// SPDX-License-Identifier: Apache-2.0
// What docs/training-loop.md's loop takes as given: the data set on the host
// (rows and labels, as the examples' Fashion-MNIST loader returns them), an
// RNG for the shuffles and the number of epochs.
#include <cstdint>
#include <random>
#include <vector>

#include <mixprec/mixprec.hpp>

using namespace mixprec;
extern TensorView<const half> rows;  // [60000, 784], on the host
std::vector<std::int32_t> labels;    // 60000 labels
std::mt19937_64 rng(1);
const int epochs = 10;
