#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes include/mixprec/monitor/report_assets.hpp from assets/report/.

The monitor report's stylesheet and script are ordinary files
(assets/report/report.css, report.js) that editors and linters understand;
the header-only library carries them as string literals in a generated
header, committed so that an installed mixprec needs neither the files nor
this script. Run through CMake:

    cmake --build build --target report_assets     # rewrite the header
    ctest -R monitor_report_assets                 # is it in step?

Usage: embed_report_assets.py REPO_ROOT [--check]
  --check: write nothing; exit 1 if the committed header differs from what
  the assets give (naming the command that fixes it).
"""
import pathlib
import sys

ASSETS = [("report_css_parts", "assets/report/report.css"), ("report_js_parts", "assets/report/report.js")]
HEADER = "include/mixprec/monitor/report_assets.hpp"
DELIMITER = "mixprec"
# MSVC limits one string literal to 16,380 single-byte characters; pieces
# are cut at line ends below that.
MAX_PIECE = 16000


def pieces(text, path):
    if f"){DELIMITER}\"" in text:
        sys.exit(f"{path}: contains ){DELIMITER}\", which would end the raw string literal")
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        if len(line.encode()) > MAX_PIECE:
            sys.exit(f"{path}: a line of {len(line.encode())} bytes, more than a piece's {MAX_PIECE}")
        if len((current + line).encode()) > MAX_PIECE:
            out.append(current)
            current = ""
        current += line
    if current:
        out.append(current)
    return out


def generate(root):
    lines = [
        "// SPDX-License-Identifier: Apache-2.0",
        "// The monitor report's stylesheet and script as string literals, for",
        "// render_report (monitor/report.hpp). GENERATED from assets/report/ by",
        "// scripts/embed_report_assets.py: edit those files, then run",
        "// `cmake --build <build> --target report_assets`; the test",
        "// monitor_report_assets fails while this file is out of step with them.",
        "#pragma once",
        "",
        "#include \"mixprec/core/config.hpp\"",
        "",
        "#include <string_view>",
        "",
        "// Doxygen (which documents no detail::) skips the literals: its parser",
        "// misreads the JavaScript inside raw strings (docs/Doxyfile.in defines",
        "// MIXPREC_DOXYGEN).",
        "#ifndef MIXPREC_DOXYGEN",
        "MIXPREC_NAMESPACE_BEGIN namespace monitor::detail {",
        "",
    ]
    for name, path in ASSETS:
        text = (root / path).read_text(encoding="utf-8")
        lines.append(f"// {path}, in pieces of at most {MAX_PIECE} bytes (MSVC's limit for one literal).")
        lines.append(f"inline constexpr std::string_view {name}[] = {{")
        for piece in pieces(text, path):
            lines.append(f"R\"{DELIMITER}({piece}){DELIMITER}\",")
        lines.append("};")
        lines.append("")
    lines += ["}  // namespace monitor::detail", "MIXPREC_NAMESPACE_END", "#endif  // MIXPREC_DOXYGEN", ""]
    return "\n".join(lines)


def main():
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--check"):
        sys.exit(__doc__)
    root = pathlib.Path(sys.argv[1])
    text = generate(root)
    header = root / HEADER
    if len(sys.argv) == 3:
        if not header.exists() or header.read_text(encoding="utf-8") != text:
            print(f"{HEADER} is out of step with assets/report/: run "
                  "`cmake --build <build> --target report_assets` and commit the header", file=sys.stderr)
            return 1
        print(f"{HEADER} is in step with assets/report/")
        return 0
    if not header.exists() or header.read_text(encoding="utf-8") != text:
        header.write_text(text, encoding="utf-8")
        print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
