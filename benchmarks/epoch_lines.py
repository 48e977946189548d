# SPDX-License-Identifier: Apache-2.0
"""Reads the line the Fashion-MNIST examples print after each epoch, for the scripts that run them.

The line is Progress::finish's in examples/common/classifier.hpp:

    epoch %2d  loss %.4f  scale %-8g  skipped %3lld  %8.0f images/s  test accuracy %.4f[  <monitor status>]

e.g. "epoch  2  loss 0.3518  scale 65536     skipped   0   2437481 images/s  test accuracy 0.8633  monitor ok".
On a terminal it starts with "\\r" and the same epoch's progress lines
(which carry no test accuracy) stand before it; they do not match.
"""
import collections
import re

# loss and scale are printed by %.4f and %g: "nan", "inf" and "1e+06" are theirs too.
EPOCH_LINE = re.compile(r"epoch +(\d+) +loss +(\S+) +scale +(\S+) +skipped +(\d+) +([\d.]+) images/s +"
                        r"test accuracy ([\d.]+)")

EpochLine = collections.namedtuple("EpochLine", "epoch loss scale skipped images_per_s accuracy")


def parse_epoch_lines(out):
    """The epoch lines in an example's output (its stdout), in order, as EpochLine(int, float, float, int, float,
    float); other lines are passed over."""
    return [EpochLine(int(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4)), float(m.group(5)),
                      float(m.group(6))) for m in EPOCH_LINE.finditer(out)]
