"""The MX reference: goldens for the special cases, E8M0 rounding, and properties on random data."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_cases import CASES, RCEIL_BOUNDARIES, MXCase, f32_from_bits
from mxfp8_compile import numerics
from mxfp8_compile.numerics import from_mx, to_mx

MODES = ["rceil", "floor"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_special_case_goldens(case: MXCase, mode: str) -> None:
    qdata, scales = to_mx(case.tensor(), mode=mode)
    scale, _ = case.expected[mode]
    assert scales.tolist() == [[scale]]
    torch.testing.assert_close(qdata.view(torch.uint8), case.expected_data(mode), rtol=0, atol=0)


@pytest.mark.parametrize("bits,byte", RCEIL_BOUNDARIES, ids=lambda v: hex(v) if v > 255 else str(v))
def test_rceil_boundaries(bits: int, byte: int) -> None:
    descale = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
    assert numerics.e8m0_rceil(descale).item() == byte


@pytest.mark.parametrize(
    "amax,byte",
    [(0.0, 0), (1.0, 119), (255.9, 126), (256.0, 127), (448.0, 127), (512.0, 128),
     (f32_from_bits(0x00000001), 0), (2.0**-119, 0), (2.0**-118, 1), (float("inf"), 255)],
)
def test_floor_scale_bytes(amax: float, byte: int) -> None:
    assert numerics.e8m0_floor(torch.tensor([amax])).item() == byte


def test_e8m0_decode_is_exact_over_all_bytes() -> None:
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = numerics.e8m0_to_fp32(b).double()
    expected = torch.tensor([2.0 ** (i - 127) for i in range(255)] + [math.nan], dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=0, atol=0, equal_nan=True)
    recip = numerics.e8m0_reciprocal(b[:255]).double()
    torch.testing.assert_close(recip * expected[:255], torch.ones(255, dtype=torch.float64), rtol=0, atol=0)
    # The torch e8m0 dtype agrees where it can represent the value.
    torch.testing.assert_close(values, b.view(torch.float8_e8m0fnu).double(), rtol=0, atol=0, equal_nan=True)


def test_every_block_along_any_dim_matches_the_last_dim() -> None:
    x = torch.randn(64, 5, 96)
    q, s = to_mx(x, dim=0)
    ql, sl = to_mx(x.movedim(0, -1).contiguous())
    assert q.shape == x.shape and s.shape == (2, 5, 96) and q.is_contiguous()
    assert torch.equal(q.view(torch.uint8), ql.movedim(-1, 0).view(torch.uint8))
    assert torch.equal(s, sl.movedim(-1, 0))


def test_non_contiguous_input_quantizes_like_its_contiguous_copy() -> None:
    x = torch.randn(96, 64, dtype=torch.bfloat16).t()  # (64, 96), strides (1, 64)
    q, s = to_mx(x)
    qc, sc = to_mx(x.contiguous())
    assert torch.equal(q.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(s, sc)


# --------------------------------------------------------------------------------------------
# Properties on random data spanning the whole exponent range.
# --------------------------------------------------------------------------------------------


@st.composite
def hp_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    blocks = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, blocks * 32)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    # A random binade per block, from tiny (fp32 subnormal) to huge (near fp32 max).
    exp = torch.randint(-140, 120, (*lead, blocks, 1), generator=g).double()
    x = (x.reshape(*lead, blocks, 32) * torch.exp2(exp)).reshape(shape)
    # Sprinkle exact zeros and whole zero blocks.
    x = torch.where(torch.rand(shape, generator=g) < 0.05, 0.0, x)
    return x.to(dtype)


def _amax_f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], -1, 32).abs().amax(-1)


@settings(max_examples=150, deadline=None)
@given(hp_tensors(), st.sampled_from(MODES))
def test_property_data_in_range_and_error_bounded(x: torch.Tensor, mode: str) -> None:
    q, s = to_mx(x, mode=mode)
    assert q.float().abs().max() <= 448
    back = from_mx(q, s, dtype=torch.float64)
    err = (back - x.double()).abs()
    bound = numerics.mx_error_bound(x, mode=mode).double()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@settings(max_examples=150, deadline=None)
@given(hp_tensors())
def test_property_rceil_never_saturates_and_is_the_smallest_such_power(x: torch.Tensor) -> None:
    _, s = to_mx(x, mode="rceil")
    descale = (_amax_f32(x) * torch.tensor(1 / 448, dtype=torch.float32)).double()
    scale = torch.exp2(s.double() - 127)
    # |x| / scale <= 448 for every element: nothing saturates.
    blocks = x.double().reshape(*x.shape[:-1], -1, 32).abs()
    assert bool((blocks <= 448 * scale.unsqueeze(-1)).all())
    # 2**(s-127) >= descale > 2**(s-128), except where descale is below 2**-127 (byte 0).
    assert bool((scale >= descale).all())
    assert bool(((scale / 2 < descale) | (s == 0)).all())


@settings(max_examples=150, deadline=None)
@given(hp_tensors())
def test_property_floor_follows_floor_log2_amax_minus_8(x: torch.Tensor) -> None:
    _, s = to_mx(x, mode="floor")
    for amax, byte in zip(_amax_f32(x).flatten().tolist(), s.flatten().tolist()):
        if amax == 0.0 or amax < 2.0**-126:  # zero or fp32 subnormal: exponent field 0
            assert byte == 0
            continue
        _, e = math.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
        assert byte == max(min(e - 1 - 8, 128), -127) + 127
