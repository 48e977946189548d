#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 21's runs on one machine with several GPUs, in one command: the
# topology, NCCL's own all-reduce bandwidth (the ceiling), the rank
# consistency and NCCL-against-MPI tests on 2..G ranks, compute-sanitizer
# memcheck on 2 ranks, the Fashion-MNIST examples on 1, 2, 4 (8) GPUs
# (MLP hidden 4096 at batch 1024 a GPU, CNN at 256; fp16 dynamic and bf16;
# plain data parallelism and ZeRO-1) with each GPU's peak memory, and
# PyTorch DDP + GradScaler + fused AdamW on the same MLP (eager and with the
# step in a CUDA graph). Logs in $OUT; benchmarks/multi_gpu_summary.py
# prints the table last. Installs nothing; every stage runs even when one
# before it failed, and the exit status says whether any did.
#
#   OUT=out-mg EPOCHS=10 DATA=/path/to/fashion-mnist benchmarks/multi_gpu_run.sh
#
# NVLink multicast stays off in every process (the device machines'
# rule, which a program that used it could break for others): the three
# variables below, passed by mpirun to every rank.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/out-multi-gpu}"
EPOCHS="${EPOCHS:-10}"
DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
BUILD="${MIXPREC_BUILD_DIR:-$ROOT/build-multi-gpu}"
PYTHON="${PYTHON:-python3}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
: >"$OUT/stages.txt"
[[ "$EPOCHS" =~ ^[0-9]+$ && "$EPOCHS" -ge 2 ]] || { echo "EPOCHS = '$EPOCHS': a whole number >= 2" >&2; exit 2; }

GPUS="$(nvidia-smi -L | grep -c '^GPU ')"
WORLDS=()
for w in 1 2 4 8; do ((w <= GPUS)) && WORLDS+=("$w"); done
((GPUS >= 2)) || echo "only $GPUS GPU(s): the runs of several ranks are left out" >&2
MPI=(mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
     -x NVSHMEM_DISABLE_NVLS -x PATH -x LD_LIBRARY_PATH)

# stage NAME LOG COMMAND...: runs it, output in LOG, "NAME<TAB>ok|FAIL (exit N)" into stages.txt.
stage() {
  local name="$1" log="$2" rc=0
  shift 2
  "$@" >"$log" 2>&1 || rc=$?
  if ((rc == 0)); then printf '%s\tok\n' "$name"; else printf '%s\tFAIL (exit %d, %s)\n' "$name" "$rc" "$log"; fi \
    >>"$OUT/stages.txt"
}
# with_memory MEMLOG COMMAND...: COMMAND, while nvidia-smi samples every
# GPU's used memory every 200 ms into MEMLOG (index, MiB); the first lines
# are the idle baseline.
with_memory() {
  local memlog="$1" sampler rc=0
  shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$memlog" 2>/dev/null &
  sampler=$!
  sleep 1
  "$@" || rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  return "$rc"
}

nvidia-smi -L >"$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1

stage build "$OUT/build.log" bash -c "cmake -S '$ROOT' -B '$BUILD' -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=ON -DMIXPREC_BUILD_BENCHMARKS=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build '$BUILD' -j \"\$(nproc)\" --target fashion_mnist_mlp \
  fashion_mnist_cnn bench_reduce_nccl dist_nccl_mpi_gpu_test"

for w in "${WORLDS[@]}"; do
  stage "nccl_allreduce_$w" "$OUT/nccl_$w.txt" "${MPI[@]}" -np "$w" "$BUILD/benchmarks/bench_reduce_nccl" \
    --benchmark_filter=BM_nccl_allreduce --benchmark_format=csv
  ((w >= 2)) || continue
  stage "consistency_$w" "$OUT/consistency_$w.log" "${MPI[@]}" -np "$w" "$BUILD/tests/dist_nccl_mpi_gpu_test"
done
if ((GPUS >= 2)); then
  stage memcheck_2 "$OUT/memcheck_2.log" "${MPI[@]}" -np 2 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$BUILD/tests/dist_nccl_mpi_gpu_test"
fi

for model in mlp cnn; do
  exe="$BUILD/examples/fashion_mnist_$model"
  size=(--batch 256)
  [[ $model == mlp ]] && size=(--hidden 4096 --batch 1024)
  for precision in fp16 bf16; do
    for zero1 in off on; do
      for w in "${WORLDS[@]}"; do
        tag="${model}_${precision}_zero1-${zero1}_$w"
        stage "$tag" "$OUT/$tag.log" with_memory "$OUT/$tag.mem" "${MPI[@]}" -np "$w" "$exe" --device cuda \
          --precision "$precision" --zero1 "$zero1" --epochs "$EPOCHS" --data "$DATA" "${size[@]}"
      done
    done
  done
done

# PyTorch DDP on the MLP, the same model, batch a GPU, epochs and data.
for precision in fp16 bf16; do
  for w in "${WORLDS[@]}"; do
    tag="ddp_${precision}_$w"
    stage "$tag" "$OUT/$tag.log" with_memory "$OUT/$tag.mem" "${MPI[@]}" -np "$w" "$PYTHON" \
      "$ROOT/benchmarks/compare_ddp.py" --device cuda --precision "$precision" --hidden 4096 --batch 1024 \
      --epochs "$EPOCHS" --data "$DATA" --modes eager,graph --json-out "$OUT/$tag.json"
  done
done

"$PYTHON" "$ROOT/benchmarks/multi_gpu_summary.py" "$OUT" | tee "$OUT/summary.txt"
! grep -q FAIL "$OUT/stages.txt"
