#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 21's runs on one machine with several GPUs: the topology, NCCL's own
# all-reduce bandwidth (the ceiling), the NCCL-against-MPI and rank
# consistency tests on 2, 4, 8 ranks (as many as there are GPUs) and
# compute-sanitizer memcheck on 2, the Fashion-MNIST examples on 1, 2, 4 (8)
# GPUs (MLP hidden 4096 at batch 1024 a GPU, CNN at 256; fp16 dynamic and
# bf16; plain data parallelism and ZeRO-1; the monitor off, as PyTorch has
# none) with the largest rise of any GPU's memory, and PyTorch DDP +
# GradScaler + fused AdamW on the same MLP (eager and with the step in a
# CUDA graph, each its own launch). Logs in $OUT (the device tool's, which
# comes back; default ./out-multi-gpu); the tables last
# (benchmarks/multi_gpu_summary.py, also runnable later on the logs alone).
# Installs nothing. Every stage has a time limit (a hang is recorded as
# HANG) and runs even when one before it failed; the exit status says
# whether any failed.
#
#   EPOCHS=6 ONLY=build,nccl,tests benchmarks/multi_gpu_run.sh   # then ONLY=build,mlp; ONLY=build,cnn,ddp
#
# ONLY picks parts (default all): build, nccl, tests, mlp, cnn, ddp; a call
# of the device tool has 10 minutes, so split the parts over calls (the
# build is incremental while the machine stays warm). DATA: Fashion-MNIST's
# .gz files (default $ROOT/.data, else the Debian package's folder; on the
# device machine copy them into .data and carry it).
# NVLink multicast stays off in every process (the device machines' rule:
# a program that used it could put shared GPUs out of service): the three
# variables below, passed by mpirun to every rank.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/out-multi-gpu}"
EPOCHS="${EPOCHS:-6}"
ONLY=",${ONLY:-build,nccl,tests,mlp,cnn,ddp},"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-300}"
DATA="${DATA:-}"
if [[ -z "$DATA" ]]; then
  DATA="$ROOT/.data"
  [[ -f "$DATA/train-images-idx3-ubyte.gz" ]] || DATA=/usr/share/datasets/fashion-mnist
fi
BUILD="${MIXPREC_BUILD_DIR:-$ROOT/build-multi-gpu}"
PYTHON="${PYTHON:-python3}"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
[[ "$EPOCHS" =~ ^[0-9]+$ && "$EPOCHS" -ge 2 ]] || { echo "EPOCHS = '$EPOCHS': a whole number >= 2" >&2; exit 2; }
[[ -f "$DATA/train-images-idx3-ubyte.gz" ]] || { echo "DATA = '$DATA': no train-images-idx3-ubyte.gz" >&2; exit 2; }

GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"
((GPUS >= 1)) || { echo "nvidia-smi lists no GPU" >&2; exit 2; }
((GPUS >= 2)) || echo "only 1 GPU: the runs of several ranks are left out" >&2
WORLDS=()
for w in 1 2 4 8; do ((w <= GPUS)) && WORLDS+=("$w"); done
MPI=(mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
     -x NVSHMEM_DISABLE_NVLS -x PATH -x LD_LIBRARY_PATH)
wants() { [[ "$ONLY" == *",$1,"* ]]; }

# stage NAME LOG COMMAND...: COMMAND (a shell function or a program) within
# STAGE_TIMEOUT, output in LOG; appends "NAME<TAB>ok|HANG|FAIL (...)" to
# stages.txt. A program's run is `timeout`'s; a function's programs take
# their own (run below).
stage() {
  local name="$1" log="$2" rc=0
  shift 2
  "$@" >"$log" 2>&1 || rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="HANG (killed after ${STAGE_TIMEOUT} s, $log)"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAIL (exit $rc, $log)"
  printf '%s\t%s\n' "$name" "$status" >>"$OUT/stages.txt"
}
run() { timeout -k 30 "$STAGE_TIMEOUT" "$@"; }
# with_memory MEMLOG COMMAND...: each GPU's used memory (MiB) before
# ("idle, index, MiB") and every 200 ms during COMMAND ("index, MiB").
with_memory() {
  local memlog="$1" sampler rc=0
  shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits | sed 's/^/idle, /' >"$memlog"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >>"$memlog" 2>/dev/null &
  sampler=$!
  run "$@" || rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  return "$rc"
}
build() {
  local cudacxx=()
  command -v nvcc >/dev/null || cudacxx=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cudacxx[@]}" -DMIXPREC_ENABLE_CUDA=ON \
    -DMIXPREC_ENABLE_CUDNN=ON -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON -DMIXPREC_BUILD_BENCHMARKS=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 || return
  # (configure's lines are in this stage's log: NCCL is optional there, needed here)
  grep -q "mixprec: NCCL ON" "$OUT/build.log" || { echo "configure found no NCCL (mixprec: NCCL ON missing)"; return 1; }
  cmake --build "$BUILD" -j "$(nproc)" --target fashion_mnist_mlp fashion_mnist_cnn bench_reduce_nccl \
    dist_nccl_mpi_gpu_test
}
# A test that skipped everything (no GPU for a rank) has not passed.
consistency() {
  run "${MPI[@]}" -np "$1" "$BUILD/tests/dist_nccl_mpi_gpu_test" || return
  ! grep -q "SKIPPED" "$OUT/consistency_$1.log"
}
# Both ranks' memcheck reports, each with "ERROR SUMMARY: 0 errors". NCCL
# probes kernels of other architectures and handles the API errors itself
# (scripts/gpu-check.sh does the same): API errors are not reported.
memcheck() {
  rm -f "$OUT"/memcheck_2.rank*.log
  run "${MPI[@]}" -np 2 "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 1 \
    --log-file "$OUT/memcheck_2.rank%q{OMPI_COMM_WORLD_RANK}.log" "$BUILD/tests/dist_nccl_mpi_gpu_test" || return
  [[ "$(cat "$OUT"/memcheck_2.rank*.log 2>/dev/null | grep -c 'ERROR SUMMARY: 0 errors')" == 2 ]]
}

nvidia-smi -L >"$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
wants build && stage build "$OUT/build.log" build

if wants nccl; then
  for w in "${WORLDS[@]}"; do
    stage "nccl_allreduce_$w" "$OUT/nccl_$w.log" run "${MPI[@]}" -np "$w" "$BUILD/benchmarks/bench_reduce_nccl" \
      --benchmark_filter=BM_nccl_allreduce --benchmark_out="$OUT/nccl_$w.csv" --benchmark_out_format=csv
  done
fi
if wants tests && ((GPUS >= 2)); then
  for w in "${WORLDS[@]}"; do
    ((w >= 2)) && stage "consistency_$w" "$OUT/consistency_$w.log" consistency "$w"
  done
  stage memcheck_2 "$OUT/memcheck_2.log" memcheck
fi

port=29500
for model in mlp cnn; do
  wants "$model" || continue
  exe="$BUILD/examples/fashion_mnist_$model"
  size=(--batch 256)
  [[ $model == mlp ]] && size=(--hidden 4096 --batch 1024)
  for precision in fp16 bf16; do
    for zero1 in off on; do
      for w in "${WORLDS[@]}"; do
        tag="${model}_${precision}_zero1-${zero1}_$w"
        stage "$tag" "$OUT/$tag.log" with_memory "$OUT/$tag.mem" "${MPI[@]}" -np "$w" "$exe" --device cuda \
          --precision "$precision" --zero1 "$zero1" --monitor off --epochs "$EPOCHS" --data "$DATA" "${size[@]}"
      done
    done
  done
done

# PyTorch DDP on the MLP, the same model, batch a GPU, epochs and data; each
# mode its own launch (its memory alone), each launch its own port.
if wants ddp; then
  for precision in fp16 bf16; do
    for w in "${WORLDS[@]}"; do
      for mode in eager graph; do
        tag="ddp_${precision}_${mode}_$w"
        port=$((port + 1))
        export MASTER_PORT=$port
        stage "$tag" "$OUT/$tag.log" with_memory "$OUT/$tag.mem" "${MPI[@]}" -x MASTER_PORT \
          -np "$w" "$PYTHON" "$ROOT/benchmarks/compare_ddp.py" --device cuda --precision "$precision" \
          --hidden 4096 --batch 1024 --epochs "$EPOCHS" --data "$DATA" --modes "$mode" --json-out "$OUT/$tag.json"
      done
    done
  done
fi

"$PYTHON" "$ROOT/benchmarks/multi_gpu_summary.py" "$OUT" >"$OUT/summary.txt" ||
  printf 'summary\tFAIL (multi_gpu_summary.py)\n' >>"$OUT/stages.txt"
cat "$OUT/summary.txt"
! grep -qE $'\t(FAIL|HANG)' "$OUT/stages.txt"
