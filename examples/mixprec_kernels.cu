// SPDX-License-Identifier: Apache-2.0
// The one .cu file of the examples: it links mixprec's CUDA kernels behind
// the host API that the .cpp trainers call (docs/getting-started.md).
#include <mixprec/cuda/backend.cuh>
