#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""mixprec's AdamW step for each lean state layout against PyTorch's fused AdamW on all-bf16 state.

mixprec: BM_api_AdamW_layout of build/benchmarks/bench_optimizer_step (the
host API: AdamW + DeviceGradScaler step and update, bf16 weights and
gradients, one run per optim::StateLayout; its bytes per parameter counted
from the layout, the scaler's finite check included) and BM_device_copy, the
copy ceiling, from the same run. PyTorch: torch.optim.AdamW(fused=True,
capturable=True) on bf16 parameters, gradients and state (14 B a parameter:
gradient read, parameter and both moments read and written; no master, no
scaler), the step captured in a CUDA graph after a warm-up on a side stream.
Both over the same list (model_list.py: 1M-element weights alternating with
1024-element biases) at the same sizes, on the same GPU. CUDA events; PyTorch:
the median of --replays graph replays after 3 warm-up replays.

    python3 benchmarks/compare_pytorch_lean.py [--bench build/benchmarks/bench_optimizer_step]
        [--log2-sizes 22 24 26 28 30] [--replays 20]

Prints a markdown table; "vs torch" is mixprec's time over PyTorch's (below 1: faster).
"""
import argparse
import json
import os
import re
import subprocess
import sys

from model_list import median_ms, tensor_list

TORCH_BYTES_PER_PARAM = 14  # bf16: gradient read (2), parameter read + write (4), two moments read + write (8)


def require_cuda_torch():
    try:
        import torch
    except ImportError as e:
        sys.exit(f"compare_pytorch_lean.py: needs PyTorch with CUDA (import torch failed: {e})")
    if not torch.cuda.is_available():
        sys.exit(f"compare_pytorch_lean.py: torch {torch.__version__} sees no CUDA device "
                 f"(torch.version.cuda = {torch.version.cuda})")
    return torch


def torch_adamw_bf16_ms(torch, n, replays):
    """Fused AdamW on bf16 parameters, gradients and state, one step as a CUDA graph replay."""
    params = [torch.full((s,), 0.25, dtype=torch.bfloat16, device="cuda", requires_grad=True) for s in tensor_list(n)]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True, capturable=True)
    # As PyTorch documents for capture: warm up on a side stream (this also
    # allocates the state, which must exist before capture), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    state_dtypes = {t.dtype for st in opt.state.values() for k, t in st.items() if k != "step"}
    if state_dtypes != {torch.bfloat16}:
        sys.exit(f"compare_pytorch_lean.py: expected bf16 AdamW state, got {state_dtypes}")
    ms = median_ms(torch, graph.replay, replays)
    del graph, opt, params
    torch.cuda.empty_cache()
    return ms


def torch_copy_gbps(torch, replays):
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    nbytes = 1 << 30
    a = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = median_ms(torch, lambda: b.copy_(a), replays)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_bench(bench, sizes):
    if not os.access(bench, os.X_OK):
        sys.exit(f"compare_pytorch_lean.py: --bench {bench} is not an executable "
                 "(build it: ninja -C build bench_optimizer_step)")
    sizes_re = "|".join(str(n) for n in sizes)
    flt = f"^BM_device_copy|^BM_api_AdamW_layout/n:({sizes_re})/"
    out = subprocess.run([bench, "--benchmark_format=json", f"--benchmark_filter={flt}"],
                         check=True, capture_output=True, text=True).stdout
    ours, copy = [], None
    for b in json.loads(out)["benchmarks"]:
        name = b["run_name"]
        if name.startswith("BM_device_copy"):
            copy = b["GBps"]
            continue
        m = re.match(r"BM_api_AdamW_layout/n:(\d+)/layout:(\d+)", name)
        if m:
            ours.append((int(m.group(1)), int(m.group(2)), b))
    if not ours:
        sys.exit(f"compare_pytorch_lean.py: {bench} ran no BM_api_AdamW_layout (filter {flt})")
    return ours, copy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default="build/benchmarks/bench_optimizer_step")
    parser.add_argument("--log2-sizes", type=int, nargs="+", default=[22, 24, 26, 28, 30],
                        help="parameter counts as powers of two (default: 22 24 26 28 30)")
    parser.add_argument("--replays", type=int, default=20, help="timed graph replays per size (default: 20)")
    args = parser.parse_args()
    torch = require_cuda_torch()
    sizes = [1 << k for k in args.log2_sizes]

    theirs = {n: torch_adamw_bf16_ms(torch, n, args.replays) for n in sizes}
    torch_copy = torch_copy_gbps(torch, args.replays)
    ours, copy = run_bench(args.bench, sizes)
    ceiling = "BM_device_copy"
    if copy is None:
        copy, ceiling = torch_copy, "torch copy_"

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; copy ceiling ({ceiling}) {copy:.0f} GB/s, "
          f"torch copy_ {torch_copy:.0f} GB/s\n")
    print("| params | layout | B/param | time ms | GB/s | of copy | vs torch |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in sizes:
        t = theirs[n]
        gbps = TORCH_BYTES_PER_PARAM * n / (t * 1e-3) / 1e9
        print(f"| 2^{n.bit_length() - 1} | torch fused AdamW, all bf16 (graph) | {TORCH_BYTES_PER_PARAM} | "
              f"{t:.3f} | {gbps:.0f} | {gbps / copy:.0%} | 1.00 |")
        for size, _, b in sorted((o for o in ours if o[0] == n), key=lambda o: o[1]):
            ms = b["real_time"]  # the benchmark's unit is ms
            print(f"| 2^{size.bit_length() - 1} | mixprec {b.get('label', '?')} | {b['Bpp']:.4g} | {ms:.3f} | "
                  f"{b['GBps']:.0f} | {b['GBps'] / copy:.0%} | {ms / t:.2f} |")


if __name__ == "__main__":
    main()
