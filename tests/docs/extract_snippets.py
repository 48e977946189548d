#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Extracts the ```cpp blocks of the docs into translation units that CI compiles.

Usage: extract_snippets.py ROOT OUT_DIR FILE.md...

Each fenced block whose info string is `cpp` is classified:

- a whole program (it defines `int main(`): compiled, linked and run as a
  ctest of its own (exit status 0 passes);
- a fragment: compiled inside the body of a function that is never called.

An HTML comment on the line(s) just before the fence (blank lines allowed in
between) says what a block needs; it is invisible on the rendered page but
readable in the source:

    <!-- snippet: context NAME -->   the fragment uses the names declared in
                                     tests/docs/context/NAME.hpp (a prelude)
    <!-- snippet: needs cuda -->     compiled by nvcc, only where mixprec::cuda
                                     exists (so is any block that includes a
                                     .cuh header)
    <!-- snippet: needs mpi -->      linked to mixprec::mpi, only where it
                                     exists (so is any block that includes
                                     <mixprec/dist/mpi.hpp>); its programs run
                                     under mpiexec on 2 ranks
    <!-- snippet: needs torch -->    linked to mixprec::torch (libtorch), only
                                     where it exists (so is any block that
                                     includes <mixprec/torch/params.hpp> or a
                                     <torch/...> header)
    <!-- snippet: file -->           not a function body: declarations at
                                     namespace scope (a whole source file
                                     without main), compiled, not run
    <!-- snippet: skip REASON -->    not compiled (REASON is required)

Several can share a comment, separated by `;`.

Blocks needing the same target share ONE translation unit (CI compiles a file
that includes the whole library in about a minute): each block goes in its
own namespace, its `#include` lines (and its prelude's) are hoisted to the top
of the file, and a program's `main` is renamed and called by a dispatcher
`main` that takes the program's name as its first argument. A `#line`
directive before every block makes compiler errors name the markdown file
and line.

Writes, in OUT_DIR: docs_snippets_<target>.cpp (or .cu for cuda) for each
target that has blocks, and snippets.cmake, which sets
MIXPREC_DOC_TARGETS (the targets written) and MIXPREC_DOC_PROGRAMS_<target>
(the programs' names). A file is rewritten only when its content changes, so
an unchanged doc does not rebuild anything.
"""

import os
import re
import sys

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([A-Za-z0-9_+-]*)")
MARKER = re.compile(r"^\s*<!--\s*snippet:(.*?)-->\s*$")
MAIN = re.compile(r"\bint\s+main\s*\(")
INCLUDE = re.compile(r"^\s*#\s*include\b")


class Block:
    def __init__(self, path, line, code, marker):
        self.path = path      # relative to ROOT
        self.line = line      # 1-based line of the block's first code line
        self.code = code
        self.context = None
        self.needs = set()
        self.skip = None
        self.file = False
        for item in (marker or "").split(";"):
            words = item.split(None, 1)
            if not words:
                continue
            key, value = words[0], (words[1].strip() if len(words) > 1 else "")
            if key == "context" and value:
                self.context = value
            elif key == "needs" and value in ("cuda", "mpi", "torch"):
                self.needs.add(value)
            elif key == "file" and not value:
                self.file = True
            elif key == "skip" and value:
                self.skip = value
            else:
                raise SystemExit(f"{path}:{line - 1}: unknown snippet marker '{item.strip()}' "
                                 "(context NAME; needs cuda|mpi|torch; file; skip REASON)")
        if re.search(r"#\s*include\s*[<\"][^>\"]*\.cuh[>\"]", code):
            self.needs.add("cuda")
        if re.search(r"#\s*include\s*<mixprec/dist/(mpi|nccl_mpi)\.hpp>", code):
            self.needs.add("mpi")
        if re.search(r"#\s*include\s*<(mixprec/torch/[^>]*|torch/[^>]*)>", code):
            self.needs.add("torch")
        if "torch" in self.needs and self.needs & {"cuda", "mpi"}:
            raise SystemExit(f"{path}:{line}: a block needing torch cannot need cuda or mpi too "
                             "(no docs target links both)")
        self.program = bool(MAIN.search(code))

    @property
    def name(self):
        stem = re.sub(r"[^A-Za-z0-9]", "_", os.path.splitext(self.path)[0])
        return f"{stem}_{self.line}"

    @property
    def target(self):
        # cuda wins: a .cu file, linked to mixprec::cuda (and to mpi if needed).
        for t in ("cuda", "torch", "mpi"):
            if t in self.needs:
                return t
        return "host"


def read_blocks(root, rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        lines = f.read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3)
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].lstrip().startswith(fence):
            end += 1
        if lang == "cpp":
            marker, k = None, i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0:
                mm = MARKER.match(lines[k])
                if mm:
                    marker = mm.group(1)
            blocks.append(Block(rel, start + 1, "\n".join(lines[start:end]), marker))
        i = end + 1
    return blocks


def split_includes(code):
    includes, body = [], []
    for line in code.split("\n"):
        (includes if INCLUDE.match(line) else body).append(line)
    return includes, body


def body_with_lines(path, first_line, code):
    """The code with its #include lines blanked, under a #line directive."""
    out = [f'#line {first_line} "{path}"']
    for line in code.split("\n"):
        out.append("" if INCLUDE.match(line) else line)
    return "\n".join(out)


def render(root, blocks, target):
    includes = ["#include <cstdlib>", "#include <cstdio>", "#include <cstring>",
                "#include <type_traits>"]
    seen = set(includes)
    parts = []
    programs = []
    for b in blocks:
        prelude = None
        if b.context:
            rel = f"tests/docs/context/{b.context}.hpp"
            path = os.path.join(root, rel)
            if not os.path.isfile(path):
                raise SystemExit(f"{b.path}:{b.line - 1}: context '{b.context}': no file {rel}")
            with open(path, encoding="utf-8") as f:
                prelude = (rel, f.read())
        for src in ([prelude[1]] if prelude else []) + [b.code]:
            for inc in split_includes(src)[0]:
                inc = inc.strip()
                if inc not in seen:
                    seen.add(inc)
                    includes.append(inc)
        ns = f"doc_{b.name}"
        kind = "program" if b.program else ("file" if b.file else "fragment")
        text = [f"// ---- {b.path}:{b.line} ({kind}"
                f"{', context ' + b.context if b.context else ''})",
                f"namespace {ns} {{"]
        if prelude:
            text.append(body_with_lines(prelude[0], 1, prelude[1]))
        if b.program:
            text.append(body_with_lines(b.path, b.line, MAIN.sub("int snippet_main(", b.code)))
            programs.append(b.name)
        elif b.file:
            text.append(body_with_lines(b.path, b.line, b.code))
        else:
            # Never called: the fragment has to compile, not to run. inline:
            # not emitted, so names a prelude only declares need no definition.
            text.append("[[maybe_unused]] inline void snippet_fragment() {")
            text.append(body_with_lines(b.path, b.line, b.code))
            text.append("}")
        text.append(f"}}  // namespace {ns}")
        parts.append("\n".join(text))

    dispatch = ["", "#line 1 \"extract_snippets.py (dispatcher)\"",
                "namespace {",
                "template <class F>",
                "int call_main(F f, int argc, char** argv) {",
                "  if constexpr (std::is_invocable_v<F, int, char**>) return f(argc, argv);",
                "  else return f();",
                "}",
                "}  // namespace",
                "",
                "int main(int argc, char** argv) {",
                "  if (argc < 2) { std::fprintf(stderr, \"usage: %s PROGRAM [args]\\n\", argv[0]); return 2; }"]
    for p in programs:
        dispatch.append(f"  if (std::strcmp(argv[1], \"{p}\") == 0) "
                        f"return call_main(doc_{p}::snippet_main, argc - 1, argv + 1);")
    dispatch += ["  std::fprintf(stderr, \"no program %s\\n\", argv[1]);", "  return 2;", "}"]

    header = ["// Generated by tests/docs/extract_snippets.py from the docs' ```cpp blocks.",
              f"// Target: {target}. Do not edit: edit the markdown.", ""]
    return "\n".join(header + includes + [""] + parts + dispatch) + "\n", programs


def write_if_changed(path, text):
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    root, out = argv[1], argv[2]
    os.makedirs(out, exist_ok=True)
    blocks = []
    for rel in argv[3:]:
        blocks += read_blocks(root, rel)
    by_target = {}
    skipped = []
    for b in blocks:
        if b.skip:
            skipped.append(f"{b.path}:{b.line}: {b.skip}")
            continue
        by_target.setdefault(b.target, []).append(b)
    cmake = ["# Generated by tests/docs/extract_snippets.py.",
             f"set(MIXPREC_DOC_TARGETS {' '.join(sorted(by_target))})",
             f"set(MIXPREC_DOC_BLOCKS {len(blocks)})",
             f"set(MIXPREC_DOC_SKIPPED \"{'; '.join(skipped)}\")"]
    for target, bs in sorted(by_target.items()):
        text, programs = render(root, bs, target)
        ext = "cu" if target == "cuda" else "cpp"
        write_if_changed(os.path.join(out, f"docs_snippets_{target}.{ext}"), text)
        cmake.append(f"set(MIXPREC_DOC_PROGRAMS_{target} {' '.join(programs)})")
        cmake.append(f"set(MIXPREC_DOC_COUNT_{target} {len(bs)})")
    write_if_changed(os.path.join(out, "snippets.cmake"), "\n".join(cmake) + "\n")


if __name__ == "__main__":
    main(sys.argv)
