"""The MX reference: goldens for the special cases, E8M0 rounding, and properties on random data."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_cases import CASES, RCEIL_BOUNDARIES, MXCase, f32_from_bits
from mxfp8_compile import numerics
from mxfp8_compile.numerics import from_mx, from_mxint8, to_mx, to_mxint8

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


# --------------------------------------------------------------------------------------------
# MXINT8: int8 elements meaning q * 2**-6, an E8M0 scale per 32 (the wire format of payloads).
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(hp_tensors())
def test_property_mxint8_rounds_half_to_even_under_the_smallest_scale(x: torch.Tensor) -> None:
    q, s = to_mxint8(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    scale = torch.exp2(s.double() - 127).repeat_interleave(32, dim=-1)
    # the elements: x / scale * 64 rounded half to even, in exact float64 arithmetic
    assert torch.equal(q.double(), torch.round(x.double() / scale * 64))
    # the scale: amax * fp32(64/127) rounded up to a power of two, or byte 0 below 2**-127
    descale = (_amax_f32(x) * torch.tensor(64 / 127, dtype=torch.float32)).double()
    block_scale = torch.exp2(s.double() - 127)
    assert bool((block_scale >= descale).all())
    assert bool(((block_scale / 2 < descale) | (s == 0)).all())
    # dequantization is exact
    assert torch.equal(from_mxint8(q, s, dtype=torch.float64), q.double() * 2.0**-6 * scale)


@pytest.mark.parametrize(
    "block,byte,first",
    [
        (torch.zeros(32), 0, 0),
        (torch.full((32,), 127 * 2.0**-6), 127, 127),  # the largest element at scale 1
        (torch.full((32,), 1.0), 127, 64),
        (torch.full((32,), -2.0), 128, -64),  # 2 * 64/127 > 1: the next power of two
        (torch.full((32,), 2.0**-140), 0, 0),  # below the smallest scale's half step
        (torch.full((32,), 3.0e38), 254, 113),  # near fp32 max: 3e38 / 2**127 * 64 = 112.8
        (torch.tensor([0.5] + [2.0**-8] * 31), 126, 64),  # 2**-8 is q 0.25 at scale 2**-1: 0
    ],
)
def test_mxint8_goldens(block: torch.Tensor, byte: int, first: int) -> None:
    q, s = to_mxint8(block)
    assert int(s) == byte and int(q[0]) == first
    assert torch.equal(from_mxint8(q, s), q.float() * 2.0**-6 * 2.0 ** (byte - 127))


def test_mxint8_ties_round_to_even() -> None:
    # at scale 1 (the block maximum 1.0), x * 64 of 1/128, 3/128, -5/128 is 0.5, 1.5, -2.5
    q, s = to_mxint8(torch.tensor([1.0, 1 / 128, 3 / 128, -5 / 128] + [0.0] * 28))
    assert int(s) == 127 and q[:4].tolist() == [64, 0, 2, -2]


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_mxint8_blocks_with_nan_or_inf_dequantize_to_nan(special: float) -> None:
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    x[1, 40] = special
    q, s = to_mxint8(x)
    assert s[1, 1] == 255 and not q[1, 32:].any()
    back = from_mxint8(q, s, dtype=torch.bfloat16)
    assert back[1, 32:].isnan().all() and not back[1, :32].isnan().any() and not back[0].isnan().any()


def test_mxint8_keeps_more_of_gaussian_rows_than_mxfp8() -> None:
    # the claim of Config.a2a_wire_format: 7 bits relative to the block maximum against e4m3's
    # 3 bits relative to each value; measured 41.3 against 31.5 dB
    x = torch.randn(2048, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    int8 = numerics.sqnr(x, from_mxint8(*to_mxint8(x), dtype=torch.bfloat16))
    fp8 = numerics.sqnr(x, from_mx(*to_mx(x), dtype=torch.bfloat16))
    assert int8 >= 40 and fp8 <= 32, (int8, fp8)


def test_mxint8_along_another_dim_and_bad_input() -> None:
    x = torch.randn(64, 3, 32)
    q, s = to_mxint8(x, dim=0)
    q_last, s_last = to_mxint8(x.movedim(0, -1))
    assert torch.equal(q, q_last.movedim(-1, 0)) and torch.equal(s, s_last.movedim(-1, 0))
    assert torch.equal(from_mxint8(q, s, dim=0), from_mxint8(q_last, s_last).movedim(-1, 0))
    with pytest.raises(TypeError, match="qdata data must be int8, got torch.float8_e4m3fn"):
        from_mxint8(*to_mx(x))
    with pytest.raises(ValueError, match="not a multiple of the MX block size 32"):
        to_mxint8(torch.randn(4, 40))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 100), st.integers(0, 1))
def test_pad_to_block_appends_zeros_and_keeps_the_dot_products(size: int, dim: int) -> None:
    # small integers: every sum is exact, whatever order a GEMM adds in
    x = torch.randint(-8, 8, (3, size) if dim == 1 else (size, 3)).float()
    padded = numerics.pad_to_block(x, dim)
    assert padded.shape[dim] % 32 == 0 and padded.shape[dim] - size < 32 and padded.data_ptr() != x.data_ptr()
    assert torch.equal(padded.narrow(dim, 0, size), x)
    assert not padded.narrow(dim, size, padded.shape[dim] - size).any()
    if dim == 1:  # a contraction over the padded dim is the same
        assert torch.equal(padded @ numerics.pad_to_block(x.t(), 0), x @ x.t())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=6), st.integers(0, 5))
def test_unpad_token_groups_inverts_pad_token_groups(sizes: list[int], past: int) -> None:
    # rows past the last group belong to no group: padding drops them, unpadding gives zeros
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    rows = sum(sizes) + past
    x = torch.arange(1, rows * 3 + 1, dtype=torch.float32).view(rows, 3)
    padded, padded_offs = numerics.pad_token_groups(x, offs)
    assert torch.equal(padded_offs, numerics.padded_group_offsets(offs))
    back = numerics.unpad_token_groups(padded, offs, rows)
    assert torch.equal(back[: sum(sizes)], x[: sum(sizes)]) and not back[sum(sizes):].any()


# --- 32 x 32 tiles (to_mx_square): one weight cast for both orientations ---------------------


def _tiles(seed: int) -> torch.Tensor:
    """(2, 96, 128) bf16 whose 32 x 32 tiles are up to 2**20 apart, and whose 1 x 32 blocks are up
    to 2**6 apart within a tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 4, 32, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-10, 10, (2, 3, 1, 4, 1), generator=g).double())
    x = x * torch.exp2(torch.randint(-6, 1, (2, 3, 32, 4, 1), generator=g).double())
    return x.reshape(2, 96, 128).to(torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_square_tiles_are_mx_along_either_dim_with_the_tiles_largest_block_scale(mode: str, seed: int) -> None:
    x = _tiles(seed)
    q, tiles = numerics.to_mx_square(x, mode=mode)
    assert q.shape == x.shape and tiles.shape == (2, 3, 4) and tiles.dtype == torch.uint8
    along_k, along_n = numerics.square_scales_along(tiles, -1), numerics.square_scales_along(tiles, -2)
    assert along_k.shape == (2, 96, 4) and along_n.shape == (2, 3, 128)
    # the same bytes, read along K or along N, are the same numbers
    assert torch.equal(from_mx(q, along_k, dim=-1), from_mx(q, along_n, dim=-2))
    # a tile's scale is the largest of its 1 x 32 blocks' (both rules are monotone in amax) ...
    _, blocks = to_mx(x, dim=-1, mode=mode)
    assert torch.equal(tiles, blocks.reshape(2, 3, 32, 4).amax(dim=2))
    # ... and a block whose own scale is its tile's is quantized to the same bytes as by to_mx
    own, _ = to_mx(x, dim=-1, mode=mode)
    same = (blocks == along_k).repeat_interleave(32, dim=-1)
    assert same.any() and torch.equal(q.view(torch.uint8)[same], own.view(torch.uint8)[same])
    # and within to_mx's error bound for a block with the tile's (larger) scale
    err = (from_mx(q, along_k, dim=-1, dtype=torch.float64) - x.double()).abs()
    tile_amax = x.double().abs().reshape(2, 3, 32, 4, 32).amax(dim=(2, 4)).repeat_interleave(32, 1).repeat_interleave(32, 2)
    bound = torch.maximum(x.double().abs() * (2.0**-3 if mode == "floor" else 2.0**-4),
                          (tile_amax / 224.0).clamp(min=2.0**-127) * 2.0**-10)
    assert bool((err <= bound).all())


def test_square_tiles_with_nan_or_zero_and_bad_shapes() -> None:
    x = torch.zeros(64, 64, dtype=torch.bfloat16)
    x[0, 33] = float("nan")
    x[40:, :32] = 1.0
    q, tiles = numerics.to_mx_square(x)
    assert tiles.tolist() == [[0, 255], [numerics.E8M0_BIAS - 8, 0]]  # rceil: 1 / 448 rounds up to 2**-8
    assert q[:32, 32:].float().isnan().all() and not q[:32, :32].float().any()
    with pytest.raises(ValueError, match="not a multiple of the MX block size 32"):
        numerics.to_mx_square(torch.zeros(48, 64))
    with pytest.raises(ValueError, match="dim -1 or -2"):
        numerics.square_scales_along(tiles, 0)


@pytest.mark.parametrize("mode", MODES)
def test_the_other_orientation_comes_from_the_tile_grid(mode: str) -> None:
    x = _tiles(0)
    q, tiles = numerics.to_mx_square(x, mode=mode)
    # the transpose, cast with the transposed tile scales, is the same bytes transposed
    qt, tt = numerics.to_mx_square(x.mT, mode=mode, tile_scales=tiles.mT)
    assert torch.equal(qt.view(torch.uint8), q.mT.contiguous().view(torch.uint8)) and torch.equal(tt, tiles.mT)
    for dim, strips in ((-1, tiles.amax(dim=-1)), (-2, tiles.amax(dim=-2))):
        rebased, row_scales = numerics.rebase_square(q, tiles, dim=dim)
        # each contraction row's scale is its 32-row strip's largest tile scale
        assert torch.equal(row_scales, strips.repeat_interleave(32, dim=-1))
        # tiles at that scale keep their bytes; the others are the same numbers, shifted
        along = numerics.square_scales_along(tiles, dim)
        unshifted = (along == row_scales.unsqueeze(dim)).repeat_interleave(32, dim=dim)
        assert unshifted.any() and not unshifted.all()
        assert torch.equal(rebased.view(torch.uint8)[unshifted], q.view(torch.uint8)[unshifted])
        assert torch.equal(rebased, numerics.rebase_rowwise(q, along, dim=dim)[0])
    with pytest.raises(ValueError, match=r"tile_scales of x \(2, 96, 128\) must be uint8 \(2, 3, 4\), got torch.uint8 \(2, 4, 3\)"):
        numerics.to_mx_square(x, tile_scales=tiles.mT)
