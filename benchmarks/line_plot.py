"""A PNG line plot with no plotting library: a pixel canvas, lines, and zlib.

Enough for loss curves (the benchmarks may run where only torch and triton are installed):
several series of (x, y) points drawn as polylines in the colours given, on shared axes with
a frame, tick marks at tenths and the axis values at the ticks (a pixel font of digits, '.' and
'-'); no other text (the caller's table carries the legend).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

Point = tuple[float, float]

# 3x5 pixel glyphs, drawn at FONT_SCALE: the characters tick values need
_GLYPHS = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    ".": ("...", "...", "...", "...", ".#."), "-": ("...", "...", "###", "...", "..."),
}
FONT_SCALE = 2
GLYPH_ADVANCE = 4 * FONT_SCALE  # a glyph and one column of space
GLYPH_HEIGHT = 5 * FONT_SCALE


def text_pixels(text: str) -> set[tuple[int, int]]:
    """The inked (x, y) pixels of ``text`` drawn from (0, 0), its top-left corner, at FONT_SCALE."""
    unknown = set(text) - set(_GLYPHS)
    if unknown:
        raise ValueError(f"no glyph for {sorted(unknown)}: tick labels are digits, '.' and '-'")
    return {(i * GLYPH_ADVANCE + gx * FONT_SCALE + sx, gy * FONT_SCALE + sy)
            for i, char in enumerate(text) for gy, row in enumerate(_GLYPHS[char]) for gx, ink in enumerate(row)
            if ink == "#" for sx in range(FONT_SCALE) for sy in range(FONT_SCALE)}


def tick_label(value: float, span: float) -> str:
    """``value`` with the decimals that tell ticks a tenth of ``span`` apart (three significant
    digits of the span: 2000 -> "1200", 5.4 -> "3.62")."""
    decimals = max(0, 2 - math.floor(math.log10(span)))
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text  # no "-0.00"


def _png(width: int, height: int, rows: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(row) for row in rows)  # filter type 0 on every scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def line_plot(
    series: Sequence[tuple[Sequence[Point], tuple[int, int, int]]], *, width: int = 800, height: int = 500,
    margin: int = 56,
) -> bytes:
    """PNG bytes of ``series`` (points, RGB colour) drawn on one pair of linear axes fitted to
    all points, each tenth of an axis marked and labelled with its value (x below the frame,
    centred; y left of it, right-aligned). Series with fewer than two points are drawn as single
    dots."""
    points = [p for pts, _ in series for p in pts]
    if not points:
        raise ValueError("nothing to plot: every series is empty")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(px: int, py: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= px < width and 0 <= py < height:
            rows[py][3 * px:3 * px + 3] = bytes(rgb)

    def to_pixel(p: Point) -> tuple[int, int]:
        fx = (p[0] - x0) / (x1 - x0)
        fy = (p[1] - y0) / (y1 - y0)
        return margin + round(fx * (width - 2 * margin)), height - margin - round(fy * (height - 2 * margin))

    def line(a: tuple[int, int], b: tuple[int, int], rgb: tuple[int, int, int]) -> None:
        steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for i in range(steps + 1):
            put(round(a[0] + (b[0] - a[0]) * i / steps), round(a[1] + (b[1] - a[1]) * i / steps), rgb)

    grey = (120, 120, 120)
    corners = [(margin, margin), (width - margin, margin), (width - margin, height - margin), (margin, height - margin)]
    for a, b in zip(corners, corners[1:] + corners[:1]):
        line(a, b, grey)

    def label(text: str, left: int, top: int) -> None:
        for px, py in text_pixels(text):
            put(left + px, top + py, grey)

    for i in range(11):  # ticks at tenths of each axis, the ends included
        tx = margin + i * (width - 2 * margin) // 10
        ty = height - margin - i * (height - 2 * margin) // 10
        line((tx, height - margin), (tx, height - margin + 6), grey)
        line((margin - 6, ty), (margin, ty), grey)
        x_text, y_text = tick_label(x0 + i * (x1 - x0) / 10, x1 - x0), tick_label(y0 + i * (y1 - y0) / 10, y1 - y0)
        label(x_text, tx - (len(x_text) * GLYPH_ADVANCE - FONT_SCALE) // 2, height - margin + 10)
        label(y_text, margin - 10 - len(y_text) * GLYPH_ADVANCE + FONT_SCALE, ty - GLYPH_HEIGHT // 2)
    for pts, rgb in series:
        pixels = [to_pixel(p) for p in pts]
        for a, b in zip(pixels, pixels[1:]):
            line(a, b, rgb)
        if len(pixels) == 1:
            put(*pixels[0], rgb)
    return _png(width, height, rows)
