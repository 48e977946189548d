#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# Writes tests/monitor/sample.jsonl: a made-up but self-consistent monitor log
# (docs/monitor.md) of 300 AdamW steps, logged every 10, with three fp16/fp32
# parameters, for the report's tests. Deterministic; stdlib only:
#   /usr/bin/python3 tests/monitor/make_sample.py > tests/monitor/sample.jsonl
#
# The story it tells: two overflows at the initial scale 2^16, a loss spike
# at step 120, a NaN loss at step 150, a gradient-norm explosion at step 198
# followed by three overflows of fc2.weight, a slow drift of the gradients
# towards fp16's underflow range (more dead ReLUs, smaller gradients) that
# crosses the 25% underflow threshold near the end, and fc1.bias's updates
# stalling. The loss scale follows GradScaler's policy (backoff 0.5, growth 2
# after 50 clean steps).
import json
import math
import random

STEPS, EVERY = 300, 10
NBINS, OFFSET, MIN_E, MAX_E = 64, 46, -45, 16
GROWTH_INTERVAL = 50
UNDERFLOW_THRESHOLD = 0.25
rng = random.Random(7)

PARAMS = [
    # name, numel, dtype, mean log2|g| at step 0 (unscaled) and its drift per
    # step, spread (sd of log2|g|), share of exact zeros at the start and end
    {"name": "fc1.weight", "numel": 802816, "dtype": "float16", "mu0": -15.0, "drift": -1 / 17, "sd": 3.4,
     "z0": 0.06, "z1": 0.17, "norm": 0.80},
    {"name": "fc1.bias", "numel": 1024, "dtype": "float32", "mu0": -9.0, "drift": -1 / 22, "sd": 2.6,
     "z0": 0.0, "z1": 0.0, "norm": 0.30},
    {"name": "fc2.weight", "numel": 10240, "dtype": "float16", "mu0": -8.0, "drift": -1 / 90, "sd": 2.8,
     "z0": 0.01, "z1": 0.02, "norm": 0.52},
]
OVERFLOW_STEPS = {1, 2, 57, 199, 200, 201, 262}  # fc2.weight's gradient overflows
NAN_LOSS_STEP = 150
SKIPPED = OVERFLOW_STEPS | {NAN_LOSS_STEP}


def g(x):
    """A float with 6 significant digits, for a compact log."""
    return float(f"{x:.6g}")


def ncdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def histogram(p, t, scale, skipped_nan, overflow_count):
    """The exponent histogram of parameter p's gradient as stored (scaled)."""
    n = p["numel"]
    if skipped_nan:
        h = [0] * NBINS
        h[NBINS - 1] = n
        return h
    mu = p["mu0"] + p["drift"] * t + math.log2(scale) + rng.gauss(0, 0.15)
    zeros = p["z0"] + (p["z1"] - p["z0"]) * t / STEPS
    probs = [0.0] * NBINS
    for b in range(1, NBINS - 1):
        e = b - OFFSET
        lo = -math.inf if b == 1 else (e - mu) / p["sd"]
        hi = math.inf if b == NBINS - 2 else (e + 1 - mu) / p["sd"]
        probs[b] = (1 - zeros) * (ncdf(hi) - ncdf(lo))
    probs[0] = zeros
    if p["dtype"] == "float16":
        # An fp16 gradient holds no value below 2^-24 (it rounded to zero) and
        # none from 2^16 up (it rounded to inf).
        for b in range(1, -24 + OFFSET):
            probs[0] += probs[b]
            probs[b] = 0.0
        probs[NBINS - 2] = 0.0
    counts = [int(n * q) for q in probs]
    rest = n - sum(counts)
    order = sorted(range(NBINS), key=lambda b: n * probs[b] - counts[b], reverse=True)
    for b in order[:rest]:
        counts[b] += 1
    if overflow_count:
        take = min(overflow_count, counts[OFFSET + 10])
        counts[OFFSET + 10] -= take
        counts[NBINS - 1] += take
    return counts


def shares(h):
    total = sum(h)
    under = h[0] + sum(h[b] for b in range(1, NBINS - 1) if b == 1 or b - OFFSET < -24)
    sub = sum(h[b] for b in range(1, NBINS - 1) if b != 1 and -24 <= b - OFFSET < -14)
    over = h[NBINS - 1] + sum(h[b] for b in range(1, NBINS - 1) if b - OFFSET >= 16)
    return {"underflow": g(under / total), "subnormal": g(sub / total), "overflow": g(over / total)}


def nonfinite(x):
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def main():
    header = {
        "type": "header", "schema": "mixprec.monitor/1", "optimizer": "AdamW", "device": "cuda:0",
        "scaling": "dynamic", "init_scale": 65536, "min_scale": 1.1754944e-38, "max_scale": "inf", "every": EVERY,
        "bins": {"count": NBINS, "zero": 0, "nonfinite": NBINS - 1, "min_exponent": MIN_E, "max_exponent": MAX_E,
                 "offset": OFFSET},
        "params": [{"name": p["name"], "numel": p["numel"], "dtype": p["dtype"]} for p in PARAMS],
    }
    print(json.dumps(header))

    scale, clean = 65536.0, 0
    backoffs = []  # steps of the recent backoffs
    losses, under_hist = [], []  # (step, loss); (step, overall underflow share)
    steps = []
    for t in range(1, STEPS + 1):
        loss = 0.36 + 1.95 * math.exp(-t / 70) + rng.gauss(0, 0.035)
        if t == 120:
            loss = 2.05
        if t == NAN_LOSS_STEP:
            loss = math.nan
        gn = (0.22 + 2.6 * math.exp(-t / 55)) * math.exp(rng.gauss(0, 0.12))
        if t == 198:
            gn = 9.41
        skipped = t in SKIPPED
        if skipped:
            gn = math.nan if t == NAN_LOSS_STEP else math.inf
        steps.append({"step": t, "loss": loss, "scale": scale, "skipped": skipped, "grad_norm": gn,
                      "nonfinite_params": [0, 1, 2] if t == NAN_LOSS_STEP else ([2] if skipped else [])})
        losses.append((t, loss))
        # GradScaler's update, after the step.
        if skipped:
            scale *= 0.5
            clean = 0
            backoffs.append(t)
        else:
            clean += 1
            if clean == GROWTH_INTERVAL:
                scale *= 2
                clean = 0

        if t % EVERY:
            continue
        s = steps[-1]
        rec_steps = steps[-EVERY:]
        ratios, params, overall = [], [], [0] * NBINS
        for i, p in enumerate(PARAMS):
            h = histogram(p, t, s["scale"], t == NAN_LOSS_STEP, 37 if (i == 2 and t in OVERFLOW_STEPS) else 0)
            overall = [a + b for a, b in zip(overall, h)]
            if s["skipped"]:
                ratio = 0.0
            elif p["name"] == "fc1.bias":
                ratio = 2.2e-3 * math.exp(-t / 34) * math.exp(rng.gauss(0, 0.1))
            else:
                ratio = (1.2e-3 if i == 0 else 2.5e-3) * (0.25 + math.exp(-t / 120)) * math.exp(rng.gauss(0, 0.08))
            ratios.append(ratio)
            eps = {0: 0.01 + 0.14 * t / STEPS, 1: min(0.9, 0.02 * math.exp(t / 80)), 2: 0.004 + 0.01 * t / STEPS}[i]
            pg = s["grad_norm"] * p["norm"] / math.sqrt(sum(q["norm"] ** 2 for q in PARAMS))
            nonfin = (t == NAN_LOSS_STEP) or (i == 2 and t in OVERFLOW_STEPS)
            if nonfin:
                pg = math.nan if t == NAN_LOSS_STEP else math.inf
            elif not math.isfinite(pg):
                pg = 0.1 * p["norm"]  # another parameter overflowed; this one is finite
            params.append({"grad_norm": nonfinite(g(pg)), "update_ratio": g(ratio), "eps_share": g(eps),
                           "nonfinite": nonfin, **shares(h), "hist": h})
        ov = shares(overall)
        under_hist.append((t, ov["underflow"]))

        events = []
        def event(kind, step, param, value, threshold, message, suggestion):
            events.append({"kind": kind, "step": step, "param": param, "value": nonfinite(value),
                           "threshold": nonfinite(threshold), "message": message, "suggestion": suggestion})
        if t == 120:
            event("loss_spike", 120, None, 7.9, 4.0,
                  "The loss jumped to 2.05, 7.9 standard deviations above its mean over the last 50 steps.",
                  "Check the batch at step 120 for bad samples; lower the learning rate if spikes recur.")
        if t == NAN_LOSS_STEP:
            event("nonfinite_loss", NAN_LOSS_STEP, None, math.nan, math.inf,
                  "The loss at step 150 is NaN; the step was skipped.",
                  "Look for a log or division of zero in the loss; compute the loss in fp32.")
        if t == 200:
            event("grad_norm_explosion", 198, None, 9.41, 3.1,
                  "The gradient norm reached 9.41, over 10 times its recent median of 0.31.",
                  "Clip the gradient norm (unscale first) or lower the learning rate.")
            event("repeated_overflow", 200, "fc2.weight", 3, 3,
                  "fc2.weight's gradient overflowed in 3 of the last 10 steps.",
                  "Keep fc2's output layer in fp32, or lower init_scale.")
        if t == 210:
            event("scale_collapse", 201, None, 4, 3,
                  "The loss scale backed off 4 times in 100 steps, down to 2048.",
                  "Raise growth_interval or find the layer that overflows (see repeated_overflow).")
        if t in (270, 300):
            r = ratios[1]
            event("stalled_updates", t, "fc1.bias", r, 1e-6,
                  f"fc1.bias changes by {r:.2g} of its norm per step: its updates are lost in rounding.",
                  "Keep this parameter's master in fp32 and check that eps does not dominate Adam's denominator.")
        if ov["underflow"] >= UNDERFLOW_THRESHOLD and (t % 30 == 0 or under_hist[-2][1] < UNDERFLOW_THRESHOLD):
            event("underflow", t, None, ov["underflow"], UNDERFLOW_THRESHOLD,
                  f"{ov['underflow'] * 100:.1f}% of the scaled gradients are zero or below 2^-24: lost in fp16.",
                  "Raise the loss scale's floor (min_scale) or growth rate, or keep these gradients in bf16.")

        if t == EVERY:
            # Too little history: every figure absent, as the writer puts it.
            forecast = {"steps_to_min_scale": None, "steps_to_underflow": None, "loss_slope": None,
                        "diverging": False}
        else:
            window = [b for b in backoffs if b > t - 100]
            rate = len(window) / 100
            to_min = (math.log2(scale / 1.1754944e-38) / rate) if rate > 0.02 else None
            recent = under_hist[-5:]
            if ov["underflow"] >= UNDERFLOW_THRESHOLD:
                to_under = 0
            elif len(recent) >= 3:
                xs, ys = [a for a, _ in recent], [b for _, b in recent]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                to_under = round((UNDERFLOW_THRESHOLD - ov["underflow"]) / slope) if slope > 0 else None
            else:
                to_under = None
            fin = [(a, b) for a, b in losses[-50:] if math.isfinite(b)]
            mx, my = sum(a for a, _ in fin) / len(fin), sum(b for _, b in fin) / len(fin)
            slope = sum((a - mx) * (b - my) for a, b in fin) / sum((a - mx) ** 2 for a, _ in fin)
            forecast = {"steps_to_min_scale": None if to_min is None else round(to_min),
                        "steps_to_underflow": to_under, "loss_slope": g(slope),
                        "diverging": not math.isfinite(s["loss"])}

        record = {
            "type": "log", "step": t,
            "steps": {"first": rec_steps[0]["step"],
                      "loss": [nonfinite(g(x["loss"])) for x in rec_steps],
                      "scale": [int(x["scale"]) for x in rec_steps],  # powers of 2 here
                      "skipped": [1 if x["skipped"] else 0 for x in rec_steps],
                      "grad_norm": [nonfinite(g(x["grad_norm"])) for x in rec_steps],
                      "nonfinite_params": [x["nonfinite_params"] for x in rec_steps]},
            "params": params,
            "overall": {**ov, "hist": overall},
            "forecast": forecast,
            "events": events,
        }
        print(json.dumps(record))


if __name__ == "__main__":
    main()
