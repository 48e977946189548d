#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Reads the event file tensorboard_write_fixture wrote into DIR with
TensorBoard's own reader (tensorboard.backend.event_processing) and checks
every value it holds. Exits 77 (ctest: skipped) where the tensorboard
package is not installed.

Usage: tensorboard_read.py DIR
"""
import struct
import sys

try:
    from tensorboard.backend.event_processing import event_accumulator
except ImportError as e:  # CI machines: no tensorboard
    print(f"skipped: the tensorboard package is not installed ({e})")
    sys.exit(77)


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def main():
    acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    bad = []
    loss = acc.Scalars("loss")
    if [e.step for e in loss] != list(range(300)):
        bad.append("loss steps")
    for e in loss:
        if e.value != f32(1.0 / (e.step + 1)):
            bad.append(f"loss at {e.step}: {e.value}")
    ab = acc.Scalars("a/b")
    if len(ab) != 1 or ab[0].step != 1 << 40 or ab[0].value != -3.25:
        bad.append(f"a/b: {ab}")
    h = acc.Histograms("h")
    if len(h) != 1 or h[0].step != 12:
        bad.append(f"h: {h}")
    else:
        v = h[0].histogram_value
        got = (v.min, v.max, v.num, v.sum, v.sum_squares, list(v.bucket_limit), list(v.bucket))
        if got != (-3, 5, 7, 11, 29, [-3, 0, 5], [2, 4, 1]):
            bad.append(f"h: {got}")
    for b in bad:
        print("mismatch:", b)
    print(f"tensorboard read {len(loss)} + {len(ab)} scalars and {len(h)} histogram: "
          f"{'all as written' if not bad else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
