#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Run on a machine with a GPU (the device tool's H100): build, run every test
# (GPU tests included), compute-sanitizer memcheck/racecheck on the GPU test
# binaries, and the benchmarks. Installs nothing. Logs go to $OUT (or ./out).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUT="${OUT:-$MIXPREC_ROOT/out}"
mkdir -p "$OUT"
BUILD_DIR="${MIXPREC_BUILD_DIR:-$MIXPREC_ROOT/build-gpu}"
BUILD_TARGETS=(all)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The oracle needs a Python with PyTorch; on the lent machine that is not
# /usr/bin/python3.
TORCH_PYTHON=/usr/bin/python3
for p in /usr/bin/python3 "$(command -v python3)"; do
  if [[ -x "$p" ]] && "$p" -c 'import torch' 2>/dev/null; then TORCH_PYTHON="$p"; break; fi
done
# The examples' data: the package's folder, or a copy in .data/ (the lent
# machine has no package).
if [[ -z "${MIXPREC_FASHION_MNIST:-}" && -d "$MIXPREC_ROOT/.data/fashion-mnist" ]]; then
  export MIXPREC_FASHION_MNIST="$MIXPREC_ROOT/.data/fashion-mnist"
fi
configure_and_build -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_BENCHMARKS=ON -DMIXPREC_BUILD_EXAMPLES=ON \
  -DMIXPREC_TORCH_PYTHON="$TORCH_PYTHON" 2>&1 | tail -n 3
cd "$BUILD_DIR"
log "ctest (all)"
ctest --output-on-failure -j 4 --no-label-summary -V -L gpu 2>&1 | tee "$OUT/ctest-gpu.log" |
  grep -E '2\^32|tests passed|Failed|OK \]|FAILED|worst' | grep -v '^\s*$' | tail -n 40 || true
ctest --output-on-failure -j 8 --no-label-summary 2>&1 | tee "$OUT/ctest-all.log" | tail -n 6 || true
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Every GPU test binary under the sanitizers. Left out: the test that makes
# cudaMalloc fail on purpose (an API error the sanitizer rightly reports), and
# the two that sweep billions of elements (correct, but hours under a sanitizer).
for tool in memcheck racecheck; do
  log "compute-sanitizer --tool $tool"
  for test in tensor_gpu_test convert_gpu_test grad_check_gpu_test optimizer_step_gpu_test device_optim_gpu_test \
              nn_gpu_test monitor_gpu_test; do
    rc=0
    # device_optim_gpu_test: the fp16 sweep and every other test (the bf16
    # and fp32 sweeps run the same kernels).
    "$SANITIZER" --tool "$tool" --error-exitcode 3 "tests/$test" \
      --gtest_filter='-*CudaErrorsNameTheCallAndStatus*:*CaptureThatSynchronises*:*EveryFloatPattern*:*Beyond2Pow31*:*MatchesHostBfloat16*:*MatchesHostFloat*' \
      >"$OUT/$tool-$test.log" 2>&1 || rc=$?
    echo "$test $tool rc=$rc  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool-$test.log" | tail -n 1)"
  done
done
# memcheck only: under racecheck the example's process ends abnormally
# (exit 9, no message, 0 hazards reported) in eager and graph mode alike,
# while nn_gpu_test, which runs the same kernels, graphs and batches, is
# racecheck-clean; see docs/training-loop.md.
log "the MLP example under memcheck (1 epoch, hidden 128: the captured step replayed 233 times)"
for tool in memcheck; do
  rc=0
  "$SANITIZER" --tool "$tool" --error-exitcode 3 examples/fashion_mnist_mlp --epochs 1 --hidden 128 \
    >"$OUT/$tool-fashion_mnist_mlp.log" 2>&1 || rc=$?
  echo "fashion_mnist_mlp $tool rc=$rc  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool-fashion_mnist_mlp.log" | tail -n 1)"
done
log "the MLP against PyTorch AMP (10 epochs, both sizes)"
(cd "$MIXPREC_ROOT/benchmarks" && "$TORCH_PYTHON" compare_pytorch_mlp.py --example "$BUILD_DIR/examples/fashion_mnist_mlp" \
  --data "${MIXPREC_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}") 2>&1 | tee "$OUT/compare_pytorch_mlp.txt" | tail -n 7
log "what the instability monitor costs in the MLP example (target < 3% of step time)"
python3 "$MIXPREC_ROOT/benchmarks/monitor_overhead.py" --example examples/fashion_mnist_mlp 2>&1 |
  tee "$OUT/monitor_overhead.txt" || true
log "GPU pass-1 benchmark"
benchmarks/bench_grad_check 2>&1 | tee "$OUT/bench_grad_check.txt" | grep -E '^BM_'
log "GPU optimizer step benchmark"
benchmarks/bench_optimizer_step 2>&1 | tee "$OUT/bench_optimizer_step.txt" | grep -E '^BM_'
log "GPU layers benchmark"
benchmarks/bench_layers --benchmark_repetitions=3 --benchmark_report_aggregates_only=true 2>&1 |
  tee "$OUT/bench_layers.txt" | grep -E '_median'
log "host conversion benchmark"
benchmarks/bench_convert --benchmark_min_time=0.5 2>&1 | tee "$OUT/bench_convert.txt" | grep -E '^BM_'
