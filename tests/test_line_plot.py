"""benchmarks/line_plot.py: the PNG it writes decodes, has the size asked for, shows each
series in its colour where its points are and each axis's values at its ticks."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from line_plot import FONT_SCALE, GLYPH_ADVANCE, GLYPH_HEIGHT, line_plot, text_pixels, tick_label  # noqa: E402


def _decode(png: bytes) -> tuple[int, int, list[bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + data)
        if kind == b"IHDR":
            size = struct.unpack(">II", data[:8])
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height = size
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    return width, height, [raw[r * stride + 1:(r + 1) * stride] for r in range(height)]


def test_series_are_drawn_in_their_colours_where_their_points_are() -> None:
    red, blue = (255, 0, 0), (0, 0, 255)
    width, height, rows = _decode(line_plot([([(0, 0), (10, 10)], red), ([(0, 10), (10, 0)], blue)],
                                            width=200, height=100, margin=10))
    assert (width, height) == (200, 100)

    def pixel(x: int, y: int) -> tuple[int, ...]:
        return tuple(rows[y][3 * x:3 * x + 3])

    # red rises from bottom-left to top-right, blue falls; they cross in the middle
    assert pixel(10, 90) == red and pixel(190, 10) == red
    assert pixel(10, 10) == blue and pixel(190, 90) == blue
    assert pixel(100, 70) == (255, 255, 255)  # off both lines: background


def test_nothing_to_plot_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot([([], (0, 0, 0))])


def test_tick_labels_tell_tenths_of_the_span_apart() -> None:
    assert [tick_label(i * 199.9, 1999) for i in (0, 6, 10)] == ["0", "1199", "1999"]
    assert tick_label(0.358 + 0.3 * 5.433, 5.433) == "1.99"
    assert tick_label(-2.5, 10) == "-2.5"
    assert tick_label(-1e-9, 1) == "0"  # not "-0.00"


def test_glyphs_are_3x5_cells_scaled_and_advanced() -> None:
    one = text_pixels("1")
    assert len(one) == 8 * FONT_SCALE**2  # ".#.", "##.", ".#.", ".#.", "###"
    assert (0, 0) not in one and (FONT_SCALE, 0) in one and (0, FONT_SCALE) in one
    assert max(y for _, y in one) == GLYPH_HEIGHT - 1
    pair = text_pixels("11")
    assert pair == one | {(x + GLYPH_ADVANCE, y) for x, y in one}
    with pytest.raises(ValueError, match=r"no glyph for \['e'\]"):
        text_pixels("1e3")


def test_each_axis_is_labelled_with_its_values() -> None:
    width, height, margin = 400, 300, 56
    _, _, rows = _decode(line_plot([([(0, 0), (1000, 5)], (255, 0, 0))], width=width, height=height, margin=margin))
    grey = (120, 120, 120)

    def inked(left: int, top: int, right: int, bottom: int) -> set[tuple[int, int]]:
        return {(x - left, y - top) for y in range(top, bottom) for x in range(left, right)
                if tuple(rows[y][3 * x:3 * x + 3]) == grey}

    # y: "5.00" right-aligned 10 px left of the frame, centred on the top tick
    text = text_pixels("5.00")
    left = margin - 10 - 4 * GLYPH_ADVANCE + FONT_SCALE
    assert inked(left, margin - GLYPH_HEIGHT // 2, margin - 10, margin - GLYPH_HEIGHT // 2 + GLYPH_HEIGHT) == text
    # x: "1000" centred under the last tick, 10 px below the frame
    text = text_pixels("1000")
    left = width - margin - (4 * GLYPH_ADVANCE - FONT_SCALE) // 2
    top = height - margin + 10
    assert inked(left, top, left + 4 * GLYPH_ADVANCE - FONT_SCALE, top + GLYPH_HEIGHT) == text
