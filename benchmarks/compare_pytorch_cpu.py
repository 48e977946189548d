#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""mixprec's CPU optimizer step against PyTorch's on one thread, same sizes.

PyTorch: torch.optim on fp32 parameters with fp32 gradients (its CPU
GradScaler does not exist in torch 1.13, so its step does no unscale and no
check: the comparison favours it). mixprec: GradScaler.step + update with
fp16 weights and gradients, fp32 masters (check pass, unscale, update,
fp16 write-back), from build/benchmarks/bench_optim. Both over the same
tensor list: 1M-element weights alternating with 1024-element biases.

    python3 benchmarks/compare_pytorch_cpu.py [--bench build/benchmarks/bench_optim]
"""
import argparse
import json
import statistics
import subprocess
import time

import torch

from model_list import tensor_list



def torch_step_ms(make_opt, n, repeats, one_tensor=False):
    params = [torch.randn(s) for s in ([n] if one_tensor else tensor_list(n))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_opt(params)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def mixprec_ms(bench):
    out = subprocess.run([bench, "--benchmark_format=json", "--benchmark_min_time=0.5",
                          "--benchmark_repetitions=5", "--benchmark_report_aggregates_only=true"],
                         check=True, capture_output=True, text=True).stdout
    result = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"].split("/")
        result[(name[0].replace("BM_", ""), name[1] if len(name) > 2 else None)] = b
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", default="build/benchmarks/bench_optim")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours = mixprec_ms(args.bench)
    memcpy = ours[("memcpy", None)]
    print(f"torch {torch.__version__}, 1 thread; memcpy (read + write) {memcpy['GBps']:.1f} GB/s")
    print("torch list: the same tensor list as mixprec; torch 1 tensor: all parameters in one tensor")
    print(f"{'optimizer':<14}{'params':>10}{'torch list':>12}{'torch 1 tensor':>16}{'mixprec':>9}"
          f"{'ratio list':>12}{'ratio 1 tensor':>16}{'GB/s':>7}{'of memcpy':>11}")
    cases = [
        ("SGD_momentum", lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
        ("Adam", lambda p: torch.optim.Adam(p, lr=1e-3)),
        ("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3)),
        ("RMSprop", lambda p: torch.optim.RMSprop(p, lr=1e-3)),
    ]
    for name, make in cases:
        for n in (1 << 20, 1 << 24):
            t = torch_step_ms(make, n, args.repeats)
            t1 = torch_step_ms(make, n, args.repeats, one_tensor=True)
            b = ours[(name, str(n))]
            m = b["real_time"]  # milliseconds (the benchmark's unit)
            gbps = b["GBps"]
            print(f"{name:<14}{n:>10}{t:>10.1f}ms{t1:>14.1f}ms{m:>7.1f}ms{t / m:>11.1f}x{t1 / m:>15.1f}x"
                  f"{gbps:>7.1f}{gbps / memcpy['GBps']:>10.0%}")


if __name__ == "__main__":
    main()
