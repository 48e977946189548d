#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Shared by scripts/example.sh and scripts/test.sh: install what is missing,
# find nvcc, configure and build. Idempotent: a second run installs nothing
# and rebuilds only what changed.
set -euo pipefail

MIXPREC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${MIXPREC_BUILD_DIR:-$MIXPREC_ROOT/build}"
JOBS="${MIXPREC_JOBS:-$(nproc)}"

# The Debian packages each script installs, by purpose. README.md and
# docs/getting-started.md list the same names (the ctest docs_packages
# checks them against these lines and the install_missing calls).
BUILD_PACKAGES=(cmake ninja-build g++ ccache libeigen3-dev nlohmann-json3-dev)
EXAMPLE_PACKAGES=(zlib1g-dev dataset-fashion-mnist  # the examples read the data set's gzipped files
                  libcli11-dev)  # and parse their flags with CLI11
TEST_PACKAGES=(libgtest-dev libbenchmark-dev
               python3-numpy  # the safetensors interop tests parse files with numpy
               libopenmpi-dev openmpi-bin  # data parallelism over MPI: mixprec::mpi, the tests' mpirun
               pkg-config  # the packaging test of mixprec.pc
               chromium)  # headless, for the monitor report's render test

log() { printf '\n== %s\n' "$*"; }

# install_missing PACKAGE...: installs those of the named packages that are
# missing (apt-get update first, only then).
install_missing() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
      missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    log "dependencies: all present"
    return
  fi
  log "installing: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"
}

# With nvcc on PATH or in /usr/local/cuda, CMake decides (AUTO): CUDA is
# built when the toolkit's libraries are there too, and the configure log
# says why not otherwise (cuDNN is optional); the CUDA code is compiled (and
# its GPU tests skip) on machines without a GPU. MIXPREC_ENABLE_CUDA=ON
# makes a missing piece an error, OFF skips CUDA.
cuda_mode() {
  if [[ -n "${MIXPREC_ENABLE_CUDA:-}" ]]; then
    echo "$MIXPREC_ENABLE_CUDA"
  elif command -v nvcc >/dev/null 2>&1; then
    echo AUTO
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDACXX=/usr/local/cuda/bin/nvcc
    echo AUTO
  else
    echo OFF
  fi
}

# Which GPU code nvcc makes. On a machine with no GPU (CI), PTX only
# (90-virtual): nvcc's front end still compiles every kernel, so every
# compile error is still found, but ptxas, 70% of a kernel-heavy unit's
# compile time (device_backend.cu: 174 of 245 s on 2 cores), is skipped;
# the GPU tests skip there anyway, and a GPU that does run these binaries
# gets the PTX compiled by its driver at start-up. With a GPU, CMake's
# default (sm_90 code + compute_90 PTX, cmake/MixprecCuda.cmake).
# MIXPREC_CUDA_ARCHITECTURES overrides both (a CMAKE_CUDA_ARCHITECTURES value).
cuda_architectures() {
  if [[ -n "${MIXPREC_CUDA_ARCHITECTURES:-}" ]]; then
    echo "$MIXPREC_CUDA_ARCHITECTURES"
  elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo 90-virtual
  fi
}

configure_and_build() {
  local mode
  mode="$(cuda_mode)"
  local archs=() arch
  arch="$(cuda_architectures)"
  if [[ "$mode" != OFF && -n "$arch" ]]; then
    archs=(-DCMAKE_CUDA_ARCHITECTURES="$arch")
  fi
  log "configure (CUDA: $mode${archs:+, ${archs[0]#-D}}) in $BUILD_DIR"
  local launcher=()
  if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  cmake -S "$MIXPREC_ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DMIXPREC_ENABLE_CUDA="$mode" "${archs[@]}" "${launcher[@]}" "$@" >"$BUILD_DIR.configure.log" 2>&1 ||
    { cat "$BUILD_DIR.configure.log"; return 1; }
  grep -E '^-- mixprec' "$BUILD_DIR.configure.log" || true
  log "build (-j$JOBS)"
  cmake --build "$BUILD_DIR" -j "$JOBS" "${BUILD_TARGETS[@]/#/--target=}"
}
