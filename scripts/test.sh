#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set-up + build + every test. GPU tests skip, saying why, without a device.
# Then the CPU tests again, built with Clang under ASan + UBSan (the
# header-only library must build with both compilers; MIXPREC_CLANG=0 skips
# that leg), the threaded tests under TSan (skipped with it), then
# scripts/fuzz.sh for MIXPREC_FUZZ_SECONDS (default 120).
#   scripts/test.sh [extra ctest arguments, e.g. -L cpu or -R convert]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Checked now, not after an hour of building.
FUZZ_SECONDS="${MIXPREC_FUZZ_SECONDS:-120}"
[[ "$FUZZ_SECONDS" =~ ^[0-9]+$ ]] ||
  { echo "MIXPREC_FUZZ_SECONDS = '$FUZZ_SECONDS', must be a whole number of seconds" >&2; exit 2; }

install_missing "${BUILD_PACKAGES[@]}" "${EXAMPLE_PACKAGES[@]}" "${TEST_PACKAGES[@]}" \
  python3-torch clang doxygen  # the PyTorch oracle; the Clang sanitizer leg; the API reference
# libtorch's headers and CMake files (Debian's 1.13; the libraries come with
# python3-torch) for mixprec::torch: its test, the libtorch example and the
# docs' libtorch program (docs/libtorch.md). Not in common.sh's lists: the
# default example does not need it. 3.4 s on the 2-core machine. ON below:
# a libtorch that CMake cannot find fails the run instead of skipping them.
install_missing libtorch-dev
BUILD_TARGETS=(all)
configure_and_build -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON \
  -DMIXPREC_BUILD_BENCHMARKS=ON -DMIXPREC_ENABLE_TORCH=ON

# The CPU tests again, built with Clang under AddressSanitizer and
# UndefinedBehaviorSanitizer (which also keeps the library building with
# Clang; its -Werror header self-test is one of the tests). Only what the
# tests run is built: the tests' folder and the programs the tests run
# (the MLP example's CPU epoch, the report page the render test opens, the
# libtorch example: libtorch is not instrumented, mixprec's code and the
# adapter are, and they run clean with leak checking on); not
# the CNN example, not the benchmarks. No CUDA: this leg is about host code.
#   MIXPREC_CLANG=0          skips this leg
#   MIXPREC_ASAN_BUILD_DIR   its build tree (default: $BUILD_DIR-asan)
if [[ "${MIXPREC_CLANG:-1}" != 0 ]]; then
  # The sanitizer runtimes ship apart from the compiler (libclang-rt-N-dev).
  install_missing "libclang-rt-$(clang++ -dumpversion | cut -d. -f1)-dev"
  log "CPU tests under ASan + UBSan, built with $(clang++ --version | head -n 1)"
  (
    BUILD_DIR="${MIXPREC_ASAN_BUILD_DIR:-$BUILD_DIR-asan}"
    BUILD_TARGETS=(tests/all tests/consumer/all fashion_mnist_mlp monitor_report libtorch_mlp)
    # Any report is fatal: -fno-sanitize-recover makes every UBSan check
    # abort, as ASan always does. -O1: a quicker build than -O3, and the
    # tests still run in minutes; no NDEBUG, so Eigen's own asserts run too.
    # Line tables give the reports file:line at little cost.
    SANITIZE="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
    leg_start=$SECONDS
    MIXPREC_ENABLE_CUDA=OFF configure_and_build -DCMAKE_CXX_COMPILER=clang++ \
      -DCMAKE_CXX_FLAGS="$SANITIZE" -DCMAKE_CXX_FLAGS_RELEASE="-O1 -gline-tables-only" \
      -DCMAKE_EXE_LINKER_FLAGS="$SANITIZE" \
      -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON -DMIXPREC_BUILD_BENCHMARKS=OFF \
      -DMIXPREC_ENABLE_TORCH=ON
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
    # Every CPU-labelled test; the MPI ones (serial) with leak checking off:
    # Open MPI's own allocations at start-up and finalisation, many in
    # plug-ins unloaded by then (unnamed frames no suppression can match),
    # are reported as leaks. Every other check stays on, in mixprec's code
    # and the tests'. (No `| tail`: a failing test's sanitizer report is the
    # part to read.)
    ctest --output-on-failure -j "$JOBS" --no-label-summary -L cpu -LE mpi
    ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" ctest --output-on-failure --no-label-summary -L mpi
    log "sanitizer leg: $((SECONDS - leg_start)) s"
  )
fi

# The tests that share a scaler between threads, again, built with Clang
# under ThreadSanitizer: a leg of its own, as TSan cannot be combined with
# ASan. The race on a shared GradScaler's records (issue 15) gave the right
# bits in most runs (scaler_threads_test failed about 8 runs in 100 on two
# cores); TSan reported it on every run. Only the tests named *_threads_test
# are built: the library starts no threads of its own, so the other tests
# give TSan nothing to see. No CUDA: host code, as above. Measured with an
# empty build tree on 2 cores: 8 s with a cold ccache, 2 s with a warm one.
#   MIXPREC_CLANG=0          skips this leg too
#   MIXPREC_TSAN_BUILD_DIR   its build tree (default: $BUILD_DIR-tsan)
if [[ "${MIXPREC_CLANG:-1}" != 0 ]]; then
  install_missing "libclang-rt-$(clang++ -dumpversion | cut -d. -f1)-dev"  # the TSan runtime
  log "threaded tests under TSan, built with $(clang++ --version | head -n 1)"
  (
    BUILD_DIR="${MIXPREC_TSAN_BUILD_DIR:-$BUILD_DIR-tsan}"
    # Picked by name from the tests' CMakeLists, so that a new
    # mixprec_test(<name>_threads_test ...) joins this leg without an edit
    # here; none found is an error, not a leg that passes having run nothing.
    mapfile -t BUILD_TARGETS < <(sed -nE \
      's/^[[:space:]]*mixprec_test\(([A-Za-z0-9_]+_threads_test)[[:space:]].*/\1/p' \
      "$MIXPREC_ROOT/tests/CMakeLists.txt")
    ((${#BUILD_TARGETS[@]} > 0)) ||
      { echo "no mixprec_test(*_threads_test) in tests/CMakeLists.txt" >&2; exit 1; }
    # -O1 -g: a quick build, and reports with file:line and whole stacks for
    # both accesses; no NDEBUG, as above.
    SANITIZE="-fsanitize=thread -fno-omit-frame-pointer"
    leg_start=$SECONDS
    MIXPREC_ENABLE_CUDA=OFF configure_and_build -DCMAKE_CXX_COMPILER=clang++ \
      -DCMAKE_CXX_FLAGS="$SANITIZE" -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g" \
      -DCMAKE_EXE_LINKER_FLAGS="$SANITIZE" \
      -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=OFF -DMIXPREC_BUILD_BENCHMARKS=OFF
    log "TSan build: $((SECONDS - leg_start)) s"
    # Any report fails the test: halt_on_error stops the program at the
    # first (exit status 66); second_deadlock_stack gives a lock-order
    # report both threads' stacks. (Clang before 18 stops at start-up with
    # "ThreadSanitizer: unexpected memory mapping" on kernels with
    # vm.mmap_rnd_bits above 28; lower it there, don't skip the leg.)
    export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"
    cd "$BUILD_DIR"
    ctest --output-on-failure -j "$JOBS" --no-label-summary --no-tests=error -R '_threads_test$'
    log "TSan leg: $((SECONDS - leg_start)) s"
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
