#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""mixprec's GPU optimizer step against PyTorch's, same sizes, same GPU, same run.

PyTorch (AMP as people run it): fp32 parameters and fp32 gradients,
torch.amp.GradScaler, and AdamW(fused=True) with and without unscale_ +
clip_grad_norm_, SGD(momentum=0.9, fused=True), RMSprop(foreach=True).
mixprec: build/benchmarks/bench_optimizer_step (fp16 weights and gradients,
fp32 masters and state, check + update + finish), both the kernels launched
directly and the host API (optimizer + DeviceGradScaler step and update); the
ratio is PyTorch's time over the API's. Both over the same list:
1M-element weights alternating with 1024-element biases. CUDA events,
median of 20 steps after 3 warm-up steps.

    python3 benchmarks/compare_pytorch.py [--bench build/benchmarks/bench_optimizer_step]
"""
import argparse
import json
import subprocess

import torch

from model_list import median_ms, tensor_list



def torch_ms(make_opt, n, clip):
    params = [torch.full((s,), 0.25, device="cuda", requires_grad=True) for s in tensor_list(n)]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt = make_opt(params)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        scaler.scale(torch.ones((), device="cuda"))  # as a loop scales its loss
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()

    ms = median_ms(torch, step, 20)
    del opt, params
    torch.cuda.empty_cache()
    return ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", default="build/benchmarks/bench_optimizer_step")
    args = parser.parse_args()
    cases = [
        ("AdamW", "AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), False),
        ("AdamW_clip", "AdamW fused + unscale_ + clip", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), True),
        ("SGD_momentum", "SGD momentum fused", lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, fused=True), False),
        ("RMSprop", "RMSprop foreach", lambda p: torch.optim.RMSprop(p, lr=1e-3, foreach=True), False),
    ]
    sizes = [1 << 24, 1 << 27, 1 << 30]
    theirs = {(name, n): torch_ms(make, n, clip) for name, _, make, clip in cases for n in sizes}
    out = subprocess.run([args.bench, "--benchmark_format=json"], check=True, capture_output=True, text=True).stdout
    ours, copy = {}, None
    for b in json.loads(out)["benchmarks"]:
        parts = b["run_name"].split("/")
        if parts[0] == "BM_device_copy":
            copy = b["GBps"]
        else:
            ours[(parts[0][3:], int(parts[1]))] = b
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; device copy {copy:.0f} GB/s")
    print(f"{'case':<32}{'params':>12}{'torch ms':>10}{'kernels ms':>12}{'API ms':>9}{'ratio':>8}"
          f"{'API GB/s':>10}{'of copy':>9}")
    for name, label, _, _ in cases:
        for n in sizes:
            k, b = ours[(name, n)], ours[("api_" + name, n)]
            t, m = theirs[(name, n)], b["real_time"]
            print(f"{label:<32}{n:>12}{t:>10.2f}{k['real_time']:>12.2f}{m:>9.2f}{t / m:>7.2f}x"
                  f"{b['GBps']:>10.0f}{b['GBps'] / copy:>8.0%}")

if __name__ == "__main__":
    main()
