#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set-up + build + the default example: the Fashion-MNIST MLP in fp16 with
# dynamic loss scaling, on the GPU when one is usable, else on the CPU.
#   scripts/example.sh [more fashion_mnist_mlp flags, e.g. --epochs 3 --device cpu]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Only what the example needs: no test frameworks, no browser.
install_missing "${BUILD_PACKAGES[@]}" "${EXAMPLE_PACKAGES[@]}"
BUILD_TARGETS=(fashion_mnist_mlp)
configure_and_build -DMIXPREC_BUILD_EXAMPLES=ON -DMIXPREC_BUILD_TESTS=OFF
log "run: fashion_mnist_mlp --precision fp16 $*"
"$BUILD_DIR/examples/fashion_mnist_mlp" --precision fp16 "$@"
