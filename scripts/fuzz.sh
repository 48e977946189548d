#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fuzzes the safetensors reader for a bounded time:
#   scripts/fuzz.sh [SECONDS]          (default 120)
# Builds tests/fuzz/safetensors_fuzz with Clang, libFuzzer, AddressSanitizer
# and UBSan in build-fuzz (MIXPREC_BUILD_DIR overrides), then runs it on a
# working copy of tests/fuzz/corpus/safetensors that persists in the build
# directory, so a longer or a second run starts where the last one ended.
# Prints executions, speed, corpus size and findings; exits nonzero on a
# finding (crash-*, leak-*, timeout-*, oom-* files under build-fuzz/artifacts).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SECONDS_TO_RUN="${1:-120}"
[[ "$SECONDS_TO_RUN" =~ ^[0-9]+$ && "$SECONDS_TO_RUN" -gt 0 ]] ||
  { echo "usage: scripts/fuzz.sh [SECONDS]: SECONDS = '$SECONDS_TO_RUN', must be a positive integer" >&2; exit 2; }

# Debian's clang-14 ships libFuzzer and the sanitizer runtimes in
# libclang-rt-14-dev.
install_missing "${BUILD_PACKAGES[@]}" clang libclang-rt-14-dev

BUILD_DIR="${MIXPREC_BUILD_DIR:-$MIXPREC_ROOT/build-fuzz}"
BUILD_TARGETS=(safetensors_fuzz)
MIXPREC_ENABLE_CUDA=OFF configure_and_build -DCMAKE_CXX_COMPILER=clang++ -DMIXPREC_BUILD_FUZZERS=ON \
  -DMIXPREC_BUILD_TESTS=OFF -DMIXPREC_BUILD_EXAMPLES=OFF -DMIXPREC_INSTALL=OFF

FUZZ_DIR="$MIXPREC_ROOT/tests/fuzz"
WORK="$BUILD_DIR/fuzz-corpus/safetensors"
ARTIFACTS="$BUILD_DIR/artifacts"
mkdir -p "$WORK" "$ARTIFACTS"
cp -n "$FUZZ_DIR"/corpus/safetensors/* "$WORK"/
before=$(find "$ARTIFACTS" -type f | wc -l)

log "fuzzing safetensors_fuzz for ${SECONDS_TO_RUN}s on $(find "$WORK" -type f | wc -l) inputs"
LOG="$BUILD_DIR/fuzz-safetensors.log"
status=0
# -max_len: headers of a few KiB reach every check; longer inputs only
# slow the search. -rss_limit_mb: a header may take ~20x its size in memory.
"$BUILD_DIR/tests/fuzz/safetensors_fuzz" "$WORK" \
  -dict="$FUZZ_DIR/safetensors.dict" -max_total_time="$SECONDS_TO_RUN" -max_len=8192 -timeout=10 \
  -rss_limit_mb=2048 -artifact_prefix="$ARTIFACTS/" -print_final_stats=1 >"$LOG" 2>&1 || status=$?

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -n 1)
speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$LOG" | tail -n 1)
after=$(find "$ARTIFACTS" -type f | wc -l)
findings=$((after - before))
grep -E '^(Done|stat::(new_units_added|peak_rss_mb))' "$LOG" || true
log "safetensors_fuzz: ${execs:-?} executions, ${speed:-?} exec/s, corpus $(find "$WORK" -type f | wc -l) inputs, $findings new findings (log: $LOG)"
if ((status != 0 || findings > 0)); then
  grep -E 'ERROR|SUMMARY|invariant broken|uncaught|Test unit written' "$LOG" | head -n 20 || true
  echo "FINDING: reproduce with $BUILD_DIR/tests/fuzz/safetensors_fuzz <file from $ARTIFACTS>" >&2
  exit 1
fi
