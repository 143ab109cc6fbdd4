"""benchmarks/line_plot.py: the PNG it writes decodes, has the size asked for and shows each
series in its colour where its points are."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from line_plot import line_plot  # noqa: E402


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
