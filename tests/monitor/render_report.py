#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# The monitor report's render check: opens the page in headless Chromium and
# checks that its script drew the charts, first in the DOM, then in a
# screenshot, decoded here (stdlib only: zlib and our own PNG unfiltering).
#
#   render_report.py REPORT.html SCREENSHOT.png [--charts N]
#                    [--make MONITOR_REPORT LOG.jsonl] [--chromium PATH]
#
# With --make it first runs `MONITOR_REPORT LOG.jsonl -o REPORT.html`. Exits
# 0 when every check passes, 1 with the reasons when one fails, 2 when the
# setup is wrong (no Chromium, bad arguments).
import argparse
import collections
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

WIDTH, HEIGHT = 1280, 2400
TIMEOUT_S = 90

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)
    return ok


def find_chromium(given):
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(chromium, url, mode_args):
    """Runs headless Chromium on url with a throwaway profile; returns stdout."""
    profile = tempfile.mkdtemp(prefix="mixprec-chromium-")
    try:
        # As root, Chromium's sandbox cannot start: --no-sandbox. The virtual
        # time budget lets the page's script finish before the dump or the
        # screenshot is taken.
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
               "--user-data-dir=" + profile, "--window-size=%d,%d" % (WIDTH, HEIGHT),
               "--virtual-time-budget=5000"] + mode_args + [url]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print("chromium did not finish in %d s: %s" % (TIMEOUT_S, " ".join(cmd)))
            sys.exit(1)
        if proc.returncode != 0:
            print("chromium exited %d: %s\n%s" % (proc.returncode, " ".join(cmd),
                                                  proc.stderr.decode(errors="replace")[-3000:]))
            sys.exit(1)
        return proc.stdout.decode("utf-8", errors="replace")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# --- PNG ----------------------------------------------------------------------
def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(blob):
    """Returns (width, height, channels, rows): rows is a list of bytearrays of
    width * channels bytes. 8-bit RGB or RGBA, not interlaced."""
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file (bad signature)")
    pos, idat, ihdr = 8, [], None
    while pos < len(blob):
        length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])[0]
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError("bad CRC in chunk %r" % kind)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None:
        raise ValueError("no IHDR chunk")
    width, height, depth, colour, _, _, interlace = ihdr
    if depth != 8 or colour not in (2, 6) or interlace != 0:
        raise ValueError("unsupported PNG: bit depth %d, colour type %d, interlace %d" % (depth, colour, interlace))
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != height * (stride + 1):
        raise ValueError("image data is %d bytes, expected %d" % (len(raw), height * (stride + 1)))
    rows, prior = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 0:
            pass
        elif ftype == 1:  # Sub: the byte bpp to the left
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:  # Up: the byte above
            for i in range(stride):
                line[i] = (line[i] + prior[i]) & 0xFF
        elif ftype == 3:  # Average of left and above
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prior[i]) >> 1)) & 0xFF
        elif ftype == 4:  # Paeth
            for i in range(stride):
                if i >= bpp:
                    line[i] = (line[i] + paeth(line[i - bpp], prior[i], prior[i - bpp])) & 0xFF
                else:
                    line[i] = (line[i] + prior[i]) & 0xFF
        else:
            raise ValueError("row %d: unknown filter type %d" % (y, ftype))
        rows.append(line)
        prior = line
    return width, height, bpp, rows


def check_screenshot(path):
    with open(path, "rb") as f:
        blob = f.read()
    try:
        width, height, bpp, rows = decode_png(blob)
    except ValueError as e:
        check(False, "the screenshot decodes: %s" % e)
        return
    check((width, height) == (WIDTH, HEIGHT), "the screenshot is %dx%d (asked for %dx%d)" % (width, height, WIDTH, HEIGHT))

    # Every pixel as an RGB triple (alpha, where present, is opaque here).
    counts = collections.Counter()
    pixels = []
    for line in rows:
        row = [bytes(line[i:i + 3]) for i in range(0, len(line), bpp)]
        counts.update(row)
        pixels.append(row)
    total = width * height
    check(len(counts) > 1, "the screenshot is not a single colour")
    check(len(counts) >= 200, "the screenshot has %d distinct colours (>= 200: text, lines, a heatmap)" % len(counts))

    # Background: the colours that each cover 5% or more of the page (the
    # page's and the cards' backgrounds). Ink: pixels far from all of them.
    backgrounds = [c for c, n in counts.most_common(4) if n >= 0.05 * total]
    def far(c):
        return all(max(abs(c[k] - b[k]) for k in range(3)) > 24 for b in backgrounds)
    ink_colours = {c for c in counts if far(c)}
    # Colourful: a chart's lines, markers and heatmap, not grey text.
    colourful = {c for c in ink_colours if max(c) - min(c) > 60}

    band = 100
    ink_bands, colour_bands = [], []
    for top in range(0, height, band):
        ink = colour = 0
        for row in pixels[top:top + band]:
            for c in row:
                if c in ink_colours:
                    ink += 1
                    if c in colourful:
                        colour += 1
        area = width * min(band, height - top)
        ink_bands.append(ink / area)
        colour_bands.append(colour / area)
    with_ink = [i for i, v in enumerate(ink_bands) if v >= 0.004]
    with_colour = [i for i, v in enumerate(colour_bands) if v >= 0.002]
    n_bands = len(ink_bands)
    print("      ink per %d-px band (%%): %s" % (band, " ".join("%.1f" % (100 * v) for v in ink_bands)))
    print("      colour per band (%%):     %s" % " ".join("%.1f" % (100 * v) for v in colour_bands))
    check(len(with_ink) >= 0.8 * n_bands,
          "content (ink) in %d of %d bands down the page (>= 80%%)" % (len(with_ink), n_bands))
    check(bool(with_ink) and with_ink[-1] >= 0.7 * n_bands,
          "content reaches down the page (last band with ink: %d of %d)" % (with_ink[-1] if with_ink else -1, n_bands))
    # The charts sit between the overview and the events table: colourful
    # pixels must appear in most bands from the first chart to the last.
    check(len(with_colour) >= 0.5 * n_bands,
          "chart colours in %d of %d bands (>= 50%%)" % (len(with_colour), n_bands))
    heat = sum(n for c, n in counts.items() if c in colourful)
    check(heat >= 0.02 * total, "%.1f%% of the page is chart colour (>= 2%%)" % (100.0 * heat / total))


def check_dom(dom, charts):
    body = re.search(r"<body\b[^>]*>", dom)
    check(body is not None and 'data-rendered="ok"' in body.group(0),
          'the page\'s script finished: <body data-rendered="ok"> (found %s)' % (body.group(0) if body else "no <body>"))
    status = re.search(r'<[^>]*\bid="render-status"[^>]*>([^<]*)<', dom)
    text = status.group(1).strip() if status else None
    check(text is not None and not text.startswith("error"), "render-status reports no error (%r)" % text)
    if charts is not None:
        check(text == "%d charts" % charts, "render-status says %d charts (%r)" % (charts, text))
    n_svg = len(re.findall(r"<svg\b", dom))
    n_path = len(re.findall(r"<path\b", dom))
    n_rect = len(re.findall(r"<rect\b", dom))
    check(charts is None or n_svg >= charts, "%d <svg> elements (>= %s)" % (n_svg, charts))
    check(n_path >= 6, "%d SVG <path> elements (lines, markers; >= 6)" % n_path)
    check(n_rect >= 500, "%d SVG <rect> elements (the heatmap's cells; >= 500)" % n_rect)
    main = re.search(r'<main id="report">(.*?)</main>', dom, re.S)
    check(main is not None and "banner error" not in main.group(1), "no error banner in the page's <main>")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--charts", type=int, default=None, help="the number of charts the page must report")
    ap.add_argument("--make", nargs=2, metavar=("MONITOR_REPORT", "LOG"), help="build the page from LOG first")
    ap.add_argument("--chromium", default=None, help="the browser (default: chromium on PATH)")
    args = ap.parse_args()

    if args.make:
        exe, log = args.make
        proc = subprocess.run([exe, log, "-o", args.html], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT_S)
        print(proc.stdout.decode(errors="replace").rstrip())
        if proc.returncode != 0:
            print("%s exited %d" % (exe, proc.returncode))
            return 1
    if not os.path.isfile(args.html):
        print("no page at %s" % args.html)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("no Chromium found (Debian: apt-get install chromium; scripts/common.sh installs it)")
        return 2
    version = subprocess.run([chromium, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=TIMEOUT_S).stdout.decode(errors="replace").strip()
    print("browser: %s" % version)

    url = "file://" + os.path.abspath(args.html)
    check_dom(run_chromium(chromium, url, ["--dump-dom"]), args.charts)

    png = os.path.abspath(args.png)
    if os.path.exists(png):
        os.remove(png)
    run_chromium(chromium, url, ["--screenshot=" + png])
    if check(os.path.isfile(png), "chromium wrote the screenshot %s" % png):
        check_screenshot(png)

    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all checks passed; screenshot: %s" % png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
