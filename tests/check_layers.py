#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Fails when a header of include/mixprec/ includes one from a layer above
its own (docs/architecture.md, "Folders and layers"), or anything from
kernels/ (mixprec/cuda/...).

Usage: check_layers.py REPO_ROOT
Prints every violation as FILE:LINE: ... and exits 1 if there is one.
"""
import pathlib
import re
import sys

# Lowest first. A header may include headers of its own layer and of the
# layers before it. The umbrella (mixprec.hpp) sits above everything;
# version.hpp (macros, no includes) below everything.
LAYERS = ["core", "tensor", "optim", "amp", "nn", "data", "monitor", "io", "dist", "torch"]
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]mixprec/([^">]+)[">]')


def main() -> int:
    root = pathlib.Path(sys.argv[1])
    base = root / "include" / "mixprec"
    rank = {name: i for i, name in enumerate(LAYERS)}
    problems = []
    folders = set()
    for header in sorted(base.rglob("*.hpp")):
        rel = header.relative_to(base)
        if len(rel.parts) < 2:
            continue  # mixprec.hpp, version.hpp: the top
        layer = rel.parts[0]
        folders.add(layer)
        if layer not in rank:
            problems.append(f"{header}: folder '{layer}' is in no layer of tests/check_layers.py")
            continue
        for number, line in enumerate(header.read_text().splitlines(), 1):
            m = INCLUDE.match(line)
            if not m:
                continue
            target = m.group(1).split("/")
            if target == ["version.hpp"]:
                continue
            if len(target) < 2:
                problems.append(f"{header}:{number}: includes mixprec/{m.group(1)}, the top level")
                continue
            other = target[0]
            if other == "cuda":
                problems.append(f"{header}:{number}: includes mixprec/{m.group(1)} from kernels/")
            elif other not in rank:
                problems.append(f"{header}:{number}: includes mixprec/{m.group(1)}, a folder in no layer")
            elif rank[other] > rank[layer]:
                problems.append(f"{header}:{number}: {layer}/ includes {m.group(1)}, from the layer above "
                                f"'{other}' (order: {' < '.join(LAYERS)})")
    for p in problems:
        print(p)
    if not problems:
        print(f"layers: {len(folders)} folders, every include points down ({' < '.join(LAYERS)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
