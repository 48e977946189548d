#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set-up + build + every test. GPU tests skip, saying why, without a device.
# Then the CPU tests again, built with Clang under ASan + UBSan (the
# header-only library must build with both compilers; MIXPREC_CLANG=0 skips
# that leg), then scripts/fuzz.sh for MIXPREC_FUZZ_SECONDS (default 120).
#   scripts/test.sh [extra ctest arguments, e.g. -L cpu or -R convert]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Checked now, not after an hour of building.
FUZZ_SECONDS="${MIXPREC_FUZZ_SECONDS:-120}"
[[ "$FUZZ_SECONDS" =~ ^[0-9]+$ ]] ||
  { echo "MIXPREC_FUZZ_SECONDS = '$FUZZ_SECONDS', must be a whole number of seconds" >&2; exit 2; }

install_missing python3-torch clang  # the PyTorch oracle; the Clang sanitizer leg
BUILD_TARGETS=(all)
configure_and_build -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON \
  -DMIXPREC_BUILD_BENCHMARKS=ON

# The CPU tests again, built with Clang under AddressSanitizer and
# UndefinedBehaviorSanitizer (which also keeps the library building with
# Clang; its -Werror header self-test is one of the tests). Only what the
# tests run is built: the tests' folder and the two programs the tests run
# (the MLP example's CPU epoch, the report page the render test opens); not
# the CNN example, not the benchmarks. No CUDA: this leg is about host code.
#   MIXPREC_CLANG=0          skips this leg
#   MIXPREC_ASAN_BUILD_DIR   its build tree (default: $BUILD_DIR-asan)
if [[ "${MIXPREC_CLANG:-1}" != 0 ]]; then
  # The sanitizer runtimes ship apart from the compiler (libclang-rt-N-dev).
  install_missing "libclang-rt-$(clang++ -dumpversion | cut -d. -f1)-dev"
  log "CPU tests under ASan + UBSan, built with $(clang++ --version | head -n 1)"
  (
    BUILD_DIR="${MIXPREC_ASAN_BUILD_DIR:-$BUILD_DIR-asan}"
    BUILD_TARGETS=(tests/all fashion_mnist_mlp monitor_report)
    # Any report is fatal: -fno-sanitize-recover makes every UBSan check
    # abort, as ASan always does. -O1: a quicker build than -O3, and the
    # tests still run in minutes; no NDEBUG, so Eigen's own asserts run too.
    # Line tables give the reports file:line at little cost.
    SANITIZE="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
    leg_start=$SECONDS
    MIXPREC_ENABLE_CUDA=OFF configure_and_build -DCMAKE_CXX_COMPILER=clang++ \
      -DCMAKE_CXX_FLAGS="$SANITIZE" -DCMAKE_CXX_FLAGS_RELEASE="-O1 -gline-tables-only" \
      -DCMAKE_EXE_LINKER_FLAGS="$SANITIZE" \
      -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON -DMIXPREC_BUILD_BENCHMARKS=OFF
    log "sanitizer build: $((SECONDS - leg_start)) s"
    # Leak checking is on: LeakSanitizer works in the Debian containers this
    # runs in. (Where a sandbox denies it the ptrace-like access it needs, it
    # stops with "LeakSanitizer has encountered a fatal error" and the test
    # fails; pass ASAN_OPTIONS with detect_leaks=0 there, not MIXPREC_CLANG=0.)
    export ASAN_OPTIONS="${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=0:print_stacktrace=1:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:strict_string_checks=1}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
    # The packaging tests configure and build consumer projects with the
    # compiler and flags of the environment: the same Clang and sanitizers.
    export CXX=clang++ CXXFLAGS="$SANITIZE" LDFLAGS="$SANITIZE"
    cd "$BUILD_DIR"
    # Every CPU-labelled test: none is left out. (No `| tail`: a failing
    # test's sanitizer report is the part to read.)
    ctest --output-on-failure -j "$JOBS" --no-label-summary -L cpu
    log "sanitizer leg: $((SECONDS - leg_start)) s"
  )
fi

# Then a couple of minutes of fuzzing, where the fuzzer exists
# (scripts/fuzz.sh SECONDS builds its libFuzzer target and runs it).
#   MIXPREC_FUZZ_SECONDS     how long (default 120; 0 skips it)
if [[ -f "$MIXPREC_ROOT/scripts/fuzz.sh" ]] && ((FUZZ_SECONDS > 0)); then
  log "fuzzing for $FUZZ_SECONDS s"
  # Its own build tree beside this one's (fuzz.sh would take a
  # MIXPREC_BUILD_DIR from the environment, the main build's).
  MIXPREC_BUILD_DIR="$BUILD_DIR-fuzz" bash "$MIXPREC_ROOT/scripts/fuzz.sh" "$FUZZ_SECONDS"
fi

log "ctest"
cd "$BUILD_DIR"
ctest --output-on-failure -j "$JOBS" --no-label-summary "$@"
