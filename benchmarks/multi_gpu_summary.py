#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The tables of benchmarks/multi_gpu_run.sh's logs (issue 21), in Markdown.

    python3 benchmarks/multi_gpu_summary.py OUT_DIR

Reads OUT_DIR/stages.txt (a line a stage: name, tab, "ok" or "FAIL ..."),
nccl_W.txt (bench_reduce_nccl's CSV, rank 0's), the examples' logs
(model_precision_zero1-on|off_W.log: their epoch lines, benchmarks/
epoch_lines.py), compare_ddp.py's JSON (ddp_precision_W.json) and the memory
samples beside each run (W.mem: "GPU index, MiB used" every 200 ms, the first
second before the run: the idle baseline). images/s: the median of epochs
2..N, global (every rank's images); scaling efficiency: images/s at W over W
times images/s at 1; memory: the largest rise over the idle baseline on any
GPU during the run (nvidia-smi's used memory, the CUDA context included, the
same measure on both sides).
"""
import csv
import io
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from epoch_lines import parse_epoch_lines  # noqa: E402


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def peak_mib(path):
    """The largest rise of any GPU's used memory over its first second, or None."""
    text = read(path)
    if not text:
        return None
    samples = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            samples.setdefault(int(parts[0]), []).append(int(parts[1]))
    rises = [max(v) - min(v[:5]) for v in samples.values() if v]
    return max(rises) if rises else None


def example(out, tag):
    lines = parse_epoch_lines(read(os.path.join(out, tag + ".log")) or "")
    if len(lines) < 2:
        return None
    return {"ips": statistics.median(e.images_per_s for e in lines[1:]), "accuracy": lines[-1].accuracy,
            "skipped": sum(e.skipped for e in lines), "mib": peak_mib(os.path.join(out, tag + ".mem"))}


def nccl(out, w):
    text = read(os.path.join(out, f"nccl_{w}.txt"))
    if not text or "name," not in text:
        return []
    rows = list(csv.DictReader(io.StringIO(text[text.index("name,"):])))
    # Google Benchmark prints counters with 6 digits: the count is a power of two, taken from the name.
    return [(int(r["name"].split("/")[1]), float(r["algbw_GBps"]), float(r["busbw_GBps"]))
            for r in rows if r.get("name", "").startswith("BM_nccl_allreduce") and r.get("params")]


def fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "out-multi-gpu"
    stages = [line.split("\t", 1) for line in (read(os.path.join(out, "stages.txt")) or "").splitlines() if line]
    worlds = sorted({int(m.group(1)) for name, _ in stages for m in [re.search(r"_(\d+)$", name)] if m})
    print("## Machine\n")
    print("```\n" + (read(os.path.join(out, "gpus.txt")) or "").strip() + "\n```\n")

    print("## NCCL's all-reduce (fp16, in place; bench_reduce_nccl BM_nccl_allreduce)\n")
    print("| ranks | fp16 values | MiB | algbw GB/s | busbw GB/s |\n|---:|---:|---:|---:|---:|")
    for w in worlds:
        for n, alg, bus in nccl(out, w):
            print(f"| {w} | {n:,} | {2 * n / 2**20:,.0f} | {alg:,.1f} | {bus:,.1f} |")

    print("\n## The examples (images/s: global, median of epochs 2..N)\n")
    print("| model | precision | ZeRO-1 | GPUs | images/s | efficiency | test accuracy | skipped | peak MiB a GPU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for model in ("mlp", "cnn"):
        for precision in ("fp16", "bf16"):
            for zero1 in ("off", "on"):
                for w in worlds:
                    r = example(out, f"{model}_{precision}_zero1-{zero1}_{w}")
                    results[(model, precision, zero1, w)] = r
                    if r is None:
                        continue
                    one = results.get((model, precision, zero1, 1))
                    eff = r["ips"] / (w * one["ips"]) if one else None
                    print(f"| {model} | {precision} | {zero1} | {w} | {r['ips']:,.0f} | {fmt(eff, '.1%')} | "
                          f"{r['accuracy']:.4f} | {r['skipped']} | {fmt(r['mib'])} |")

    print("\n## Against PyTorch DDP (MLP 784-4096-4096-10, batch 1024 a GPU; mixprec without ZeRO-1)\n")
    print("| precision | GPUs | DDP eager | DDP graphed | DDP accuracy | DDP peak MiB | mixprec | vs DDP's best |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for precision in ("fp16", "bf16"):
        for w in worlds:
            text = read(os.path.join(out, f"ddp_{precision}_{w}.json"))
            if not text:
                continue
            d = json.loads(text)
            res = d.get("results", {})
            eager = res.get("eager", {}).get("images_per_s")
            graph = res.get("graph", {}).get("images_per_s")
            best = max([x for x in (eager, graph) if x is not None], default=None)
            acc = (res.get("graph") or res.get("eager") or {}).get("test_accuracy")
            ours = results.get(("mlp", precision, "off", w))
            ratio = ours["ips"] / best if ours and best else None
            print(f"| {precision} | {w} | {fmt(eager)} | {fmt(graph)} | {fmt(acc, '.4f')} | "
                  f"{fmt(peak_mib(os.path.join(out, f'ddp_{precision}_{w}.mem')))} | "
                  f"{fmt(ours['ips'] if ours else None)} | {fmt(ratio, '.2f')} |")

    print("\n## Stages\n")
    print("| stage | status |\n|---|---|")
    for name, status in stages:
        print(f"| {name} | {status} |")


if __name__ == "__main__":
    main()
