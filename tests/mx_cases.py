"""Named MX special cases: one table, reused by every test of a quantizer (reference or kernel).

Each case is one block of 32 values with the scale byte and data bytes that torchao's ``to_mx``
contract gives for each mode. Scale bytes are written out by hand from the definitions
(``numerics.ScaleMode``); data bytes are either written out or, where marked ``None``, derived
independently of the code under test: ``x / 2**(scale - 127)`` in float64, saturated to 448 and
rounded to e4m3.
"""

from __future__ import annotations

import dataclasses
import struct

import torch

BLOCK = 32
BF16_MAX = torch.finfo(torch.bfloat16).max  # 255 * 2**120
F32_MAX = torch.finfo(torch.float32).max  # (2**24 - 1) * 2**104


def f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@dataclasses.dataclass(frozen=True)
class MXCase:
    name: str
    values: tuple[float, ...]
    dtype: torch.dtype
    # mode -> (scale byte, data bytes or None for "derive from the scale")
    expected: dict[str, tuple[int, tuple[int, ...] | None]]

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float64).to(self.dtype).reshape(1, BLOCK)

    def expected_data(self, mode: str) -> torch.Tensor:
        scale, data = self.expected[mode]
        if data is not None:
            return torch.tensor(data, dtype=torch.uint8).reshape(1, BLOCK)
        x = self.tensor().to(torch.float64)
        scaled = (x / 2.0 ** (scale - 127)).clamp(-448, 448)
        return scaled.to(torch.float8_e4m3fn).view(torch.uint8)


def _fill(first: float, rest: float) -> tuple[float, ...]:
    return (first,) + (rest,) * (BLOCK - 1)


def _same(byte: int) -> tuple[int, ...]:
    return (byte,) * BLOCK


def _case(name: str, values: tuple[float, ...], dtype: torch.dtype, rceil, floor) -> MXCase:
    return MXCase(name, values, dtype, {"rceil": rceil, "floor": floor})


# 0x38 is 1.0 in e4m3, 0x30 is 0.5, 0x7E is 448, 0x77 is 240, 0x78 is 256, 0x7C is 384, 0x7F NaN.
CASES: list[MXCase] = [
    _case("zero", _fill(0.0, 0.0), torch.float32, (0, _same(0)), (0, _same(0))),
    _case("positive_448", _fill(448.0, 448.0), torch.bfloat16, (127, _same(0x7E)), (127, _same(0x7E))),
    _case("negative_448", _fill(-448.0, -448.0), torch.float32, (127, _same(0xFE)), (127, _same(0xFE))),
    # FLOOR: 2**(8 - 8) = 1, so 480 saturates to 448; RCEIL: 480/448 rounds up to 2, 480/2 = 240.
    _case(
        "saturating_480",
        _fill(480.0, 1.0),
        torch.bfloat16,
        (128, (0x77,) + (0x30,) * 31),
        (127, (0x7E,) + (0x38,) * 31),
    ),
    # bf16 max = 255 * 2**120: FLOOR 2**119 (byte 246), 510 saturates to 448; RCEIL
    # 255 * 2**120 / 448 = 2**119.19 rounds up to 2**120 (byte 247), 255 rounds to 256.
    _case("bf16_max", _fill(BF16_MAX, BF16_MAX), torch.bfloat16, (247, _same(0x78)), (246, _same(0x7E))),
    _case("f32_max", _fill(F32_MAX, -F32_MAX), torch.float32, (247, None), (246, None)),
    _case("mixed_inf_nan", _fill(float("inf"), float("nan")), torch.float32, (255, _same(0x7F)), (255, _same(0x7F))),
    _case("inf", _fill(float("-inf"), 1.0), torch.bfloat16, (255, _same(0x7F)), (255, _same(0x7F))),
    _case("nan", _fill(1.0, float("nan")), torch.float32, (255, _same(0x7F)), (255, _same(0x7F))),
    # All |x| = 3: FLOOR floor(log2 3) - 8 = -7; RCEIL 3/448 = 2**-7.2 rounds up to 2**-7.
    # -3 / 2**-7 = -384.
    _case("negative_only", _fill(-3.0, -3.0), torch.bfloat16, (120, _same(0xFC)), (120, _same(0xFC))),
    # fp32 subnormal block (2**-129): both modes give byte 0 (2**-127); data 2**-2 = 0x28.
    _case(
        "f32_subnormal",
        _fill(f32_from_bits(0x00100000), 0.0),
        torch.float32,
        (0, (0x28,) + (0,) * 31),
        (0, (0x28,) + (0,) * 31),
    ),
    # amax = 672 * 2**-127: RCEIL descale 1.5 * 2**-127 is an fp32 subnormal above 2**-127, so it
    # rounds up to byte 1; data 672 * 2**-127 / 2**-126 = 336, a tie that rounds to even 320.
    # FLOOR: 672 * 2**-127 = 1.3125 * 2**-118, so floor(log2) - 8 = -126 (byte 1) as well.
    _case("rceil_subnormal_round_up", _fill(672.0 * 2.0**-127, 0.0), torch.float32, (1, None), (1, None)),
    # amax 224: FLOOR floor(log2 224) - 8 = -1; RCEIL 224/448 = 2**-1 exactly.
    _case("mixed_signs_and_magnitudes", tuple(float((-1) ** i * (i + 1) * 7) for i in range(BLOCK)),
          torch.float32, (126, None), (126, None)),
]

# RCEIL rounding of fp32 descales to E8M0 bytes, at the boundaries (input bits -> byte).
RCEIL_BOUNDARIES: list[tuple[int, int]] = [
    (0x3F800000, 127),  # 1.0 exactly
    (0x3F800001, 128),  # just above 1.0 rounds up
    (0x7F000000, 254),  # 2**127
    (0x7F000001, 255),  # just above 2**127: no E8M0 value is larger, NaN byte
    (0x7F7FFFFF, 255),  # fp32 max
    (0x00000000, 0),  # zero -> 2**-127
    (0x00000001, 0),  # smallest subnormal
    (0x00400000, 0),  # 2**-127 exactly
    (0x00400001, 1),  # above 2**-127 rounds up to 2**-126
    (0x00800000, 1),  # 2**-126, the smallest normal
    (0x7F800000, 255),  # inf
    (0x7FC00000, 255),  # NaN
]
