// SPDX-License-Identifier: Apache-2.0
// The whole host API of mixprec in one include.
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/random.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/optim/formulas.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/optim/optimizers/adam.hpp"
#include "mixprec/optim/optimizers/rmsprop.hpp"
#include "mixprec/optim/optimizers/sgd.hpp"
#include "mixprec/optim/schedule.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/amp/scale_update.hpp"
