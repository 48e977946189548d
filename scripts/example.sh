#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set-up + build + the default example.
#   scripts/example.sh [example arguments]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_missing
BUILD_TARGETS=(synthetic_softmax)
configure_and_build -DMIXPREC_BUILD_EXAMPLES=ON
log "run: synthetic_softmax $*"
"$BUILD_DIR/examples/synthetic_softmax" "$@"
