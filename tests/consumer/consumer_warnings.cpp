// SPDX-License-Identifier: Apache-2.0
// A consumer built with -Wall -Wextra -Werror and without -Wno-psabi: the
// umbrella header, the four optimizers and the scaler, each stepped so that
// the CPU step's 8-float code is instantiated in this file.
#include "mixprec/mixprec.hpp"

int main() {
  using namespace mixprec;
  Tensor<half> w({1000}), g({1000});
  fill_uniform(w, -1.0f, 1.0f, 1);
  fill_uniform(g, -1.0f, 1.0f, 2);
  optim::SGD sgd({{"w", w, g}}, {});
  optim::AdamW adamw({{"w", w, g}});
  optim::RMSprop rmsprop({{"w", w, g}});
  optim::Lion lion({{"w", w, g}});
  amp::GradScaler scaler;
  for (optim::Optimizer* opt : {static_cast<optim::Optimizer*>(&sgd), static_cast<optim::Optimizer*>(&adamw),
                                static_cast<optim::Optimizer*>(&rmsprop), static_cast<optim::Optimizer*>(&lion)}) {
    scaler.step(*opt, 1.0);
  }
  scaler.update();
  return 0;
}
