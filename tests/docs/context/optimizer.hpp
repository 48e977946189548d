// SPDX-License-Identifier: Apache-2.0
// What docs/optimizers.md's fragments take as given: an optimizer built as
// in its first example.
#include <vector>

#include <mixprec/mixprec.hpp>

using mixprec::Device;
extern mixprec::optim::AdamW opt;
