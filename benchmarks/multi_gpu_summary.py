#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The tables of benchmarks/multi_gpu_run.sh's logs (issue 21), in Markdown.

    python3 benchmarks/multi_gpu_summary.py OUT_DIR

Reads OUT_DIR/stages.txt (a line a stage: name, tab, "ok", "HANG ..." or
"FAIL ..."), nccl_W.csv (bench_reduce_nccl's --benchmark_out, rank 0's: the
median rows of its repetitions), the examples' logs
(model_precision_zero1-on|off_W.log: their epoch lines, benchmarks/
epoch_lines.py), compare_ddp.py's JSON (ddp_precision_mode_W.json, one mode a
launch) and the memory samples beside each run (.mem: "idle, GPU index, MiB"
before the run, then "GPU index, MiB" every 200 ms). images/s: the median of
epochs 2..N, global (every rank's images); scaling efficiency: images/s at W
over W times images/s at 1; memory: the largest rise over its idle value on
any GPU during the run (nvidia-smi's used memory, the CUDA context included,
the same measure on both sides).
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
    """The largest rise of any GPU's used memory over its idle value (the
    "idle" lines; without them, the smallest of its first five samples), or
    None."""
    text = read(path)
    if not text:
        return None
    idle, samples = {}, {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0] == "idle" and parts[1].isdigit() and parts[2].isdigit():
            idle[int(parts[1])] = int(parts[2])
        elif len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            samples.setdefault(int(parts[0]), []).append(int(parts[1]))
    rises = [max(v) - idle.get(gpu, min(v[:5])) for gpu, v in samples.items() if v]
    return max(rises) if rises else None


def example(out, tag):
    lines = parse_epoch_lines(read(os.path.join(out, tag + ".log")) or "")
    if len(lines) < 2:
        return None
    return {"ips": statistics.median(e.images_per_s for e in lines[1:]), "accuracy": lines[-1].accuracy,
            "skipped": sum(e.skipped for e in lines), "mib": peak_mib(os.path.join(out, tag + ".mem"))}


def nccl(out, w):
    """(fp16 values, algbw, busbw) of each size's median row, in order."""
    text = read(os.path.join(out, f"nccl_{w}.csv"))
    if not text or "name," not in text:
        return []
    rows = csv.DictReader(io.StringIO(text[text.index("name,"):]))
    # "BM_nccl_allreduce/1048576/iterations:10/manual_time_median": the count from the name (the counter
    # column has 6 digits), the median of the repetitions (not the mean, stddev or cv rows).
    return [(int(r["name"].split("/")[1]), float(r["algbw_GBps"]), float(r["busbw_GBps"]))
            for r in rows if r.get("name", "").startswith("BM_nccl_allreduce/") and r["name"].endswith("_median")]


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
    print("| model | precision | ZeRO-1 | GPUs | images/s | efficiency | test accuracy | skipped | peak MiB (any GPU) |")
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
    print("| precision | GPUs | DDP eager | DDP graphed | DDP accuracy (eager / graphed) | DDP peak MiB "
          "(eager / graphed) | mixprec | mixprec peak MiB | vs DDP's better |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for precision in ("fp16", "bf16"):
        for w in worlds:
            runs = {}
            for mode in ("eager", "graph"):
                text = read(os.path.join(out, f"ddp_{precision}_{mode}_{w}.json"))
                r = json.loads(text).get("results", {}).get(mode) if text else None
                runs[mode] = (r or {}, peak_mib(os.path.join(out, f"ddp_{precision}_{mode}_{w}.mem")))
            ips = {m: runs[m][0].get("images_per_s") for m in runs}
            if all(v is None for v in ips.values()):
                continue
            best = max(v for v in ips.values() if v is not None)
            ours = results.get(("mlp", precision, "off", w))
            ratio = ours["ips"] / best if ours else None
            acc = " / ".join(fmt(runs[m][0].get("test_accuracy"), ".4f") for m in ("eager", "graph"))
            mib = " / ".join(fmt(runs[m][1]) for m in ("eager", "graph"))
            print(f"| {precision} | {w} | {fmt(ips['eager'])} | {fmt(ips['graph'])} | {acc} | {mib} | "
                  f"{fmt(ours['ips'] if ours else None)} | {fmt(ours['mib'] if ours else None)} | "
                  f"{fmt(ratio, '.2f')} |")

    print("\n## Stages\n")
    print("| stage | status |\n|---|---|")
    for name, status in stages:
        print(f"| {name} | {status} |")


if __name__ == "__main__":
    main()
