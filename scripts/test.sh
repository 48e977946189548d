#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set-up + build + every test. GPU tests skip, saying why, without a device.
#   scripts/test.sh [extra ctest arguments, e.g. -L cpu or -R convert]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_missing python3-torch  # the PyTorch oracle (tests/oracle)
BUILD_TARGETS=(all)
configure_and_build -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON \
  -DMIXPREC_BUILD_BENCHMARKS=ON
log "ctest"
cd "$BUILD_DIR"
ctest --output-on-failure -j "$JOBS" --no-label-summary "$@"
