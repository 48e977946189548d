#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set-up + build + every test. GPU tests skip, saying why, without a device.
# Then the CPU tests again, built with Clang (the header-only library must
# build with both compilers; set MIXPREC_CLANG=0 to skip that leg).
#   scripts/test.sh [extra ctest arguments, e.g. -L cpu or -R convert]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_missing python3-torch clang  # the PyTorch oracle; the Clang leg
BUILD_TARGETS=(all)
configure_and_build -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON \
  -DMIXPREC_BUILD_BENCHMARKS=ON

if [[ "${MIXPREC_CLANG:-1}" != 0 ]] && command -v clang++ >/dev/null 2>&1; then
  log "CPU tests built with $(clang++ --version | head -n 1)"
  CLANG_DIR="$BUILD_DIR-clang"
  (
    BUILD_DIR="$CLANG_DIR"
    BUILD_TARGETS=(convert_test convert_portable_test dtype_test tensor_test optim_test
                   optim_portable_test optim_oracle_test optim_oracle_portable_test grad_scaler_test
                   nn_test data_test header_selftest fashion_mnist_mlp)
    MIXPREC_ENABLE_CUDA=OFF configure_and_build -DCMAKE_CXX_COMPILER=clang++ \
      -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON -DMIXPREC_INSTALL=OFF
    cd "$CLANG_DIR"
    ctest --output-on-failure -j "$JOBS" --no-label-summary -R \
      '^(convert|convert_portable|dtype|tensor|optim|optim_portable|optim_oracle_generate|optim_oracle|optim_oracle_portable|grad_scaler|nn|data|example_fashion_mnist_mlp)_?(test)?$' \
      | tail -n 3
  )
fi

log "ctest"
cd "$BUILD_DIR"
ctest --output-on-failure -j "$JOBS" --no-label-summary "$@"
