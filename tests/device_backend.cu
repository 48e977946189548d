// SPDX-License-Identifier: Apache-2.0
// The one .cu file a program with a plain .cpp trainer adds: it links the
// CUDA kernels behind mixprec's host API (docs/getting-started.md, "GPU
// training from .cpp files"). Nothing else is needed.
#include <mixprec/cuda/backend.cuh>
