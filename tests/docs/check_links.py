#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Checks the relative links of the docs: every [text](target) in FILE.md
that is not a URL must name a file inside the repository, and a #anchor must
name a heading of that page (GitHub's slugs). Code spans and fenced blocks
are not links. Prints each broken link as FILE:LINE and exits 1 if any.

Usage: check_links.py ROOT FILE.md...
"""

import os
import re
import sys

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def slug(title):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    title = re.sub(r"`([^`]*)`", r"\1", title)
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    s = title.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def prose_lines(path):
    """(line number, text) of the lines outside fenced blocks, code spans blanked."""
    fence = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            m = re.match(r"^\s*(`{3,}|~{3,})", line)
            if m:
                if fence is None:
                    fence = m.group(1)
                elif m.group(1).startswith(fence):
                    fence = None
                continue
            if fence is None:
                yield n, re.sub(r"`[^`]*`", "", line)


def anchors(path, cache={}):
    if path not in cache:
        seen, out = {}, set()
        for _, line in prose_lines(path):
            m = HEADING.match(line)
            if m:
                s = slug(m.group(2))
                k = seen.get(s, 0)
                seen[s] = k + 1
                out.add(s if k == 0 else f"{s}-{k}")
            for a in re.findall(r'<a (?:name|id)="([^"]+)"', line):
                out.add(a)
        cache[path] = out
    return cache[path]


def main(argv):
    root = os.path.realpath(argv[1])
    bad = 0
    for rel in argv[2:]:
        path = os.path.join(root, rel)
        for n, line in prose_lines(path):
            for m in LINK.finditer(line):
                target = m.group(1) or m.group(2)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = os.path.realpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
                problem = None
                if not (dest == root or dest.startswith(root + os.sep)):
                    problem = "points outside the repository"
                elif not os.path.exists(dest):
                    problem = "no such file"
                elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                    problem = f"no heading #{anchor} in {os.path.relpath(dest, root)}"
                if problem:
                    print(f"{rel}:{n}: ({target}) {problem}")
                    bad += 1
    if bad:
        print(f"{bad} broken link(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
