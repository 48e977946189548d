#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The Debian packages the docs list are the ones the scripts install.

The scripts are the one source of truth: scripts/common.sh names the
packages by purpose (BUILD_PACKAGES, EXAMPLE_PACKAGES, TEST_PACKAGES), and
each script's install_missing calls say which it installs. A page lists them
in the paragraph after a marker comment, each name in backticks:

    <!-- packages: example.sh -->   every package scripts/example.sh installs
    <!-- packages: test.sh adds --> those scripts/test.sh installs beyond them

Usage: check_packages.py REPO_ROOT PAGE...   (exit 1 naming each difference)
"""
import pathlib
import re
import subprocess
import sys


def arrays(root):
    """The package arrays of scripts/common.sh, as bash sees them."""
    names = ["BUILD_PACKAGES", "EXAMPLE_PACKAGES", "TEST_PACKAGES"]
    script = "source scripts/common.sh >/dev/null\n" + "".join(
        f'echo "{n}=${{{n}[*]}}"\n' for n in names)
    out = subprocess.run(["bash", "-c", script], cwd=root, check=True, capture_output=True, text=True).stdout
    return {k: v.split() for k, v in (line.split("=", 1) for line in out.splitlines())}


def installed_by(root, script, known):
    """Every package a script's install_missing calls name (array expansions
    resolved; names computed at run time, such as libclang-rt-$(...), left
    out: they follow the compiler found)."""
    text = (root / "scripts" / script).read_text()
    text = re.sub(r"\\\n", " ", text)  # join continued lines
    packages = []
    for call in re.finditer(r"^\s*install_missing\s+([^#\n]*)", text, re.M):
        if "$(" in call.group(1):
            continue  # a name computed at run time
        for word in call.group(1).split():
            word = word.strip('"')
            m = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
            if m:
                packages += known[m.group(1)]
            elif "$" not in word:
                packages.append(word)
    return set(packages)


def listed(page_text, marker):
    """The backticked package names in the paragraph after the marker."""
    at = page_text.find(f"<!-- packages: {marker} -->")
    if at < 0:
        return None
    para = page_text[at:].split("-->", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    words = re.findall(r"`([^`\s]+)`", para)
    # Package names, not the file names the text mentions (`example.sh`).
    return {w for w in words
            if re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", w) and not re.search(r"\.(sh|pc|md|py|log|txt)$", w)}


def main():
    root = pathlib.Path(sys.argv[1])
    known = arrays(root)
    example = installed_by(root, "example.sh", known)
    test = installed_by(root, "test.sh", known)
    want = {"example.sh": example, "test.sh adds": test - example}
    failures = []
    for page in sys.argv[2:]:
        text = (root / page).read_text()
        for marker, packages in want.items():
            got = listed(text, marker)
            if got is None:
                failures.append(f"{page}: no <!-- packages: {marker} --> paragraph")
                continue
            if got != packages:
                missing = ", ".join(sorted(packages - got)) or "none"
                extra = ", ".join(sorted(got - packages)) or "none"
                failures.append(f"{page}: the packages after <!-- packages: {marker} --> differ from the scripts': "
                                f"missing {missing}; not installed by the script: {extra}")
    for f in failures:
        print(f, file=sys.stderr)
    if not failures:
        print(f"{len(sys.argv) - 2} pages list the scripts' packages: example.sh {len(example)}, "
              f"test.sh {len(test)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
