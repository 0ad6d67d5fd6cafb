"""--format svg: a self-contained flame graph, rendered by headless Chromium (Debian's
chromium): the seed leak's wrapper1 is drawn, in its colour, and the SVG needs no network."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib

import pytest

from conftest import MEMLEAK, probedsl

pytestmark = pytest.mark.usefixtures("root_required")


def png_pixels(path):
    """(width, rows of RGB(A) pixel tuples) of an 8-bit, non-interlaced PNG (Chromium's)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks, idat = 8, {}, b""
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        body = data[at + 8 : at + 8 + size]
        if kind == b"IDAT":
            idat += body
        else:
            chunks[kind] = body
        at += 12 + size
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and interlace == 0 and color in (2, 6), (depth, color, interlace)
    channels = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append([tuple(line[x * channels : x * channels + 3]) for x in range(width)])
        prev = line
    return width, rows


def chromium(*args):
    exe = shutil.which("chromium")
    assert exe, "the flame graph test renders in Debian's chromium: install it (scripts/setup.sh does)"
    result = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_seed_leaks_flame_graph_draws_wrapper1_in_a_browser_without_network(build, tmp_path):
    svg = tmp_path / "leak.svg"
    result = probedsl("run", MEMLEAK, "--format", "svg", "-o", str(svg), "--", build("leak"), input="\n")
    assert result.returncode == 0, result.stderr
    text = svg.read_text()
    # self-contained: nothing fetched (the only URL is the SVG namespace)
    assert not re.search(r"href=|src=|url\(|@import", text)
    assert re.findall(r"https?://[^\"]+", text) == ["http://www.w3.org/2000/svg"]
    width, height = map(int, re.search(r'<svg version="1.1" width="(\d+)" height="(\d+)"', text).groups())
    frame = re.search(
        r'<g class="f"[^>]*><title>wrapper1 \((\d+) bytes[^<]*</title><rect x="[\d.]+" y="(\d+)" '
        r'width="[\d.]+" height="(\d+)" fill="rgb\((\d+),(\d+),(\d+)\)"',
        text,
    )
    assert frame, text[:2000]
    assert int(frame.group(1)) == 40  # the seed's five 8-byte blocks
    y, row_height = int(frame.group(2)), int(frame.group(3))
    fill = tuple(int(frame.group(i)) for i in (4, 5, 6))
    # opened zoomed into wrapper1 (FILE.svg#zoom=NAME): its frame spans the width, labelled
    shot = tmp_path / "shot.png"
    chromium(f"--window-size={width},{height}", f"--screenshot={shot}", f"file://{svg}#zoom=wrapper1")
    shot_width, rows = png_pixels(shot)
    middle = rows[y + row_height // 2]
    assert all(middle[x] == fill for x in (shot_width // 4, shot_width // 2, 3 * shot_width // 4)), (
        fill,
        middle[shot_width // 2],
    )
    dom = chromium(f"--window-size={width},{height}", "--dump-dom", f"file://{svg}#zoom=wrapper1")
    zoomed = re.search(
        r'<title>wrapper1 \(40 bytes[^<]*</title><rect x="([\d.]+)" y="\d+" width="([\d.]+)"'
        r'[^>]*/?>(?:</rect>)?<text[^>]*>wrapper1</text>',
        dom,
    )
    assert zoomed and float(zoomed.group(2)) > 0.9 * width, zoomed  # the script zoomed and labelled it
    # unzoomed, the root frame "all" spans the width
    chromium(f"--window-size={width},{height}", f"--screenshot={shot}", f"file://{svg}")
    _, rows = png_pixels(shot)
    root = re.search(
        r'<title>all [^<]*</title><rect x="[\d.]+" y="(\d+)" width="[\d.]+" height="\d+" '
        r'fill="rgb\((\d+),(\d+),(\d+)\)"',
        text,
    )
    assert rows[int(root.group(1)) + row_height // 2][width // 2] == tuple(int(root.group(i)) for i in (2, 3, 4))
