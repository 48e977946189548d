#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The Fashion-MNIST MLP trained by PyTorch and by mixprec's example, same run.

Model 784-H-H-10 (ReLU), AdamW lr 1e-3 with the same schedule (cosine to 0
per step by default, as the example; --schedule constant), batch B, the
same number of epochs, the same normalisation; each side shuffles with its
own generator.

PyTorch, eager AMP as people write it, without input-pipeline overhead: the
data sets on the device, a shuffled permutation per epoch, fp32 parameters,
AdamW(fused=True),
and either fp16 autocast + torch.amp.GradScaler or bf16 autocast; the loss
is summed on the device (no .item() inside an epoch). Not compared: PyTorch
with CUDA graphs or torch.compile; mixprec with --graph off is the eager
counterpart (docs/performance.md). mixprec:
examples/fashion_mnist_mlp (data on the device, the step in a CUDA graph).
Throughput: images/s of the training steps only (evaluation excluded), the
median over epochs 2..N (epoch 1 holds warm-up and graph capture); accuracy:
the test set after the last epoch.

    python3 benchmarks/compare_pytorch_mlp.py --example build/examples/fashion_mnist_mlp \
        [--data DIR] [--epochs 10] [--configs 1024:256,4096:1024] [--precisions fp16,bf16]
    python3 benchmarks/compare_pytorch_mlp.py --device cpu ...   # one core each, see --cpu-*
"""
import argparse
import contextlib
import gzip
import math
import os
import re
import statistics
import subprocess
import time

import numpy as np
import torch


def load(data, split):
    with gzip.open(os.path.join(data, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(os.path.join(data, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (images.astype(np.float32) / 255.0 - 0.2860) / 0.3530
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def torch_run(data, device, precision, hidden, batch, epochs, seed, schedule):
    torch.manual_seed(seed)
    xtr, ytr = (t.to(device) for t in load(data, "train"))
    xte, yte = (t.to(device) for t in load(data, "t10k"))
    model = torch.nn.Sequential(
        torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10)).to(device)
    cuda = device == "cuda"
    # fused=True on the GPU (PyTorch's fastest AdamW); Debian's older CPU
    # torch has no such argument and no CPU GradScaler (nor needs one).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if cuda else {}))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device) if cuda and precision == "fp16" else None
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = xtr.shape[0] // batch
    total = epochs * steps
    rates = []
    done = 0
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], device=device)
        loss_sum = torch.zeros((), device=device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for s in range(steps):
            if schedule == "cosine":  # CosineAnnealingLR(T_max=total, eta_min=0); a float: no kernel
                opt.param_groups[0]["lr"] = 1e-3 * (1 + math.cos(math.pi * done / total)) / 2
            idx = perm[s * batch:(s + 1) * batch]
            with autocast(device, dtype):
                loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            loss_sum += loss.detach()
            done += 1
        if cuda:
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    with torch.no_grad(), autocast(device, dtype):
        correct = sum(int((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum()) for i in range(0, 10000, 1000))
    return rates, correct / 10000


def mixprec_run(example, data, device, precision, hidden, batch, epochs, seed, schedule, prefix):
    cmd = prefix + [example, "--device", device, "--precision", precision, "--hidden", str(hidden), "--batch",
                    str(batch), "--epochs", str(epochs), "--seed", str(seed), "--schedule", schedule, "--data", data]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rates, accuracy = [], None
    for m in re.finditer(r"epoch\s+\d+ .*?([\d.]+) images/s\s+test accuracy ([\d.]+)", out):
        rates.append(float(m.group(1)))
        accuracy = float(m.group(2))
    if len(rates) != epochs:
        raise SystemExit(f"could not read {epochs} epoch lines from: {' '.join(cmd)}\n{out}")
    return rates, accuracy


def typical(rates):
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--example", default="build/examples/fashion_mnist_mlp")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--configs", default="1024:256,4096:1024", help="hidden:batch,...")
    p.add_argument("--precisions", help="default: fp16,bf16 on cuda, fp32,bf16 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--cpu-core", type=int, default=0, help="--device cpu: the core both sides run on")
    a = p.parse_args()
    a.precisions = a.precisions or ("fp16,bf16" if a.device == "cuda" else "fp32,bf16")
    prefix = []
    if a.device == "cpu":
        torch.set_num_threads(1)
        os.sched_setaffinity(0, {a.cpu_core})
        prefix = ["taskset", "-c", str(a.cpu_core)]
    print(f"torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU, one core'}; {a.epochs} epochs, "
          f"AdamW lr 1e-3 {a.schedule}")
    rows = []
    for config in a.configs.split(","):
        hidden, batch = (int(v) for v in config.split(":"))
        for precision in a.precisions.split(","):
            t_rates, t_acc = torch_run(a.data, a.device, precision, hidden, batch, a.epochs, a.seed, a.schedule)
            m_rates, m_acc = mixprec_run(a.example, a.data, a.device, precision, hidden, batch, a.epochs, a.seed,
                                         a.schedule, prefix)
            t, m = typical(t_rates), typical(m_rates)
            rows.append((hidden, batch, precision, t, t_acc, m, m_acc, m / t))
            print(f"  done: hidden {hidden} batch {batch} {precision}", flush=True)
    label = "torch AMP" if a.device == "cuda" else "torch"
    print(f"\n| hidden | batch | precision | {label} images/s | acc | mixprec images/s | acc | ratio |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for h, b, pr, t, ta, m, ma, r in rows:
        print(f"| {h} | {b} | {pr} | {t:,.0f} | {ta:.4f} | {m:,.0f} | {ma:.4f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
