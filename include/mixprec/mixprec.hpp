// SPDX-License-Identifier: Apache-2.0
// The whole host API of mixprec in one include: every header of
// include/mixprec/ but dist/ (data parallelism: its communicators need MPI or
// NCCL, so include <mixprec/dist/mpi.hpp> or <mixprec/dist/nccl.hpp> and
// <mixprec/dist/reducer.hpp> yourself), core/cublas_check.hpp,
// core/cudnn_check.hpp (they need mixprec::cuda), and the monitor's HTML
// report: include <mixprec/monitor/report.hpp> where a program renders one
// (it holds the page's stylesheet and script, which every other file would
// compile for nothing).
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/random.hpp"
#include "mixprec/core/stream.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/tensor/eigen.hpp"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/formulas.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/optimizers/adam.hpp"
#include "mixprec/optim/optimizers/lamb.hpp"
#include "mixprec/optim/optimizers/lion.hpp"
#include "mixprec/optim/optimizers/rmsprop.hpp"
#include "mixprec/optim/optimizers/sgd.hpp"
#include "mixprec/optim/schedule.hpp"
#include "mixprec/nn/activation.hpp"
#include "mixprec/nn/conv.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/nn/linear.hpp"
#include "mixprec/nn/loss.hpp"
#include "mixprec/nn/metrics.hpp"
#include "mixprec/nn/precision.hpp"
#include "mixprec/nn/sequential.hpp"
#include "mixprec/amp/device_grad_scaler.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/amp/scale_update.hpp"
#include "mixprec/data/batches.hpp"
#include "mixprec/io/checkpoint.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/monitor/detectors.hpp"
#include "mixprec/monitor/jsonl.hpp"
#include "mixprec/monitor/monitor.hpp"
#include "mixprec/monitor/precision_fallback.hpp"
#include "mixprec/monitor/record.hpp"
