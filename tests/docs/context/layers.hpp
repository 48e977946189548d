// SPDX-License-Identifier: Apache-2.0
// What docs/layers.md's first example takes as given: one batch on the GPU
// (inputs, labels) and device scalars for the loss and a bad-label flag.
#include <cstdint>

#include <mixprec/mixprec.hpp>

extern mixprec::TensorView<const mixprec::half> x;  // [256, 784] inputs on cuda:0
const std::int32_t* labels = nullptr;                // [256] labels on cuda:0
float* loss = nullptr;                               // a float on cuda:0
int* bad_label = nullptr;                            // an int on cuda:0
