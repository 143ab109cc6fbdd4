"""Per-group token quantization and the SM100 blocked scale layouts.

The blocked layouts are checked against a brute-force, loop-by-loop implementation of the tile
formula (cuBLAS block-scaling-factor layout) with FBGEMM's per-group start offsets, written here
independently of ``numerics``.
"""

from __future__ import annotations

import random

import pytest
import torch

from mxfp8_compile import numerics
from mxfp8_compile.numerics import to_mx, to_mx_token_groups


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _offsets(sizes: list[int]) -> torch.Tensor:
    ends, total = [], 0
    for s in sizes:
        total += s
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32)


def _random_sizes(rng: random.Random, groups: int) -> list[int]:
    special = [0, 1, 31, 32, 33]
    return [rng.choice(special) if rng.random() < 0.6 else rng.randrange(0, 100) for _ in range(groups)]


# --------------------------------------------------------------------------------------------
# Token groups.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(6))
def test_token_groups_equal_each_group_quantized_alone(seed: int, dtype: torch.dtype, mode: str) -> None:
    rng = random.Random(seed)
    sizes = _random_sizes(rng, rng.randrange(1, 9))
    extra = rng.choice([0, 0, 5])  # rows past the last group belong to none
    offs = _offsets(sizes)
    k = 64
    x = torch.randn(sum(sizes) + extra, k, dtype=dtype) * 10.0 ** rng.randrange(-3, 4)
    q, s, padded_offs = to_mx_token_groups(x, offs, mode=mode)

    rows = numerics.padded_rows_bound(x.shape[0], len(sizes), 32)
    assert q.shape == (rows, k) and s.shape == (rows // 32, k)
    expected_q = torch.zeros(rows, k, dtype=torch.uint8)
    expected_s = torch.zeros(rows // 32, k, dtype=torch.uint8)
    start = padded_start = 0
    for size in sizes:
        padded = _round_up(size, 32)
        if padded:
            group = torch.zeros(padded, k, dtype=dtype)
            group[:size] = x[start : start + size]
            gq, gs = to_mx(group, dim=0, mode=mode)
            expected_q[padded_start : padded_start + padded] = gq.view(torch.uint8)
            expected_s[padded_start // 32 : (padded_start + padded) // 32] = gs
        start += size
        padded_start += padded
    assert padded_offs.tolist() == _offsets([_round_up(s, 32) for s in sizes]).tolist()
    torch.testing.assert_close(q.view(torch.uint8), expected_q, rtol=0, atol=0)
    torch.testing.assert_close(s, expected_s, rtol=0, atol=0)


def test_token_groups_without_groups_or_tokens() -> None:
    q, s, po = to_mx_token_groups(torch.randn(0, 32), _offsets([0, 0]))
    assert q.shape == (32, 32) and s.shape == (1, 32) and po.tolist() == [0, 0]
    assert not q.view(torch.uint8).any() and not s.any()
    q, s, po = to_mx_token_groups(torch.randn(7, 32), torch.zeros(0, dtype=torch.int32))
    assert q.shape == (0, 32) and po.numel() == 0


# --------------------------------------------------------------------------------------------
# Blocked layout: brute force.
# --------------------------------------------------------------------------------------------


def brute_blocked(scales: torch.Tensor) -> list[int]:
    """cuBLAS layout, element by element: 128x4 tiles row-block-major, each stored as (32, 16)."""
    rows, cols = scales.shape
    padded_rows, padded_cols = _round_up(rows, 128), _round_up(cols, 4)
    out = [0] * (padded_rows * padded_cols)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * (padded_cols // 4) + c // 4
            rr, cc = r % 128, c % 4
            out[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] = int(scales[r, c])
    return out


@pytest.mark.parametrize("rows,cols", [(1, 1), (128, 4), (130, 5), (257, 9), (64, 12)])
def test_to_blocked_matches_brute_force_and_round_trips(rows: int, cols: int) -> None:
    s = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    blocked = numerics.to_blocked(s)
    assert blocked.shape == numerics.blocked_shape(rows, cols)
    assert blocked.flatten().tolist() == brute_blocked(s)
    assert torch.equal(numerics.from_blocked(blocked, rows, cols), s)


def test_to_blocked_of_a_batch_is_per_matrix() -> None:
    s = torch.randint(0, 256, (3, 140, 6), dtype=torch.uint8)
    blocked = numerics.to_blocked(s)
    for e in range(3):
        assert blocked[e].flatten().tolist() == brute_blocked(s[e])


@pytest.mark.parametrize("seed", range(5))
def test_m_groups_layout_matches_fbgemm_offsets(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 127, 128, 129, rng.randrange(1, 300)]) for _ in range(rng.randrange(1, 6))]
    cols = rng.choice([1, 4, 7, 160])
    s = torch.randint(1, 256, (sum(sizes), cols), dtype=torch.uint8)
    out = numerics.to_blocked_m_groups(s, _offsets(sizes))

    padded_cols = _round_up(cols, 4)
    rows_bound = numerics.padded_rows_bound(sum(sizes), len(sizes), 128)
    assert out.shape == (rows_bound, padded_cols)
    expected = [0] * (rows_bound * padded_cols)
    start = 0
    for g, size in enumerate(sizes):
        # FBGEMM: group g's A scales start at sum_{i<g} round_up(size_i, 128) * round_up(K/32, 4)
        base = sum(_round_up(sizes[i], 128) for i in range(g)) * padded_cols
        chunk = brute_blocked(s[start : start + size]) if size else []
        expected[base : base + len(chunk)] = chunk
        start += size
    assert out.flatten().tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_k_groups_layout_matches_fbgemm_offsets(seed: int) -> None:
    rng = random.Random(seed)
    # token group sizes, already padded to multiples of 32 (as to_mx_token_groups leaves them)
    sizes = [32 * rng.choice([0, 1, 3, 4, 5, rng.randrange(0, 12)]) for _ in range(rng.randrange(1, 6))]
    rows = rng.choice([1, 100, 128, 200])
    cols = sum(sizes) // 32
    s = torch.randint(1, 256, (rows, cols), dtype=torch.uint8)
    out = numerics.to_blocked_k_groups(s, _offsets(sizes))

    padded_rows = _round_up(rows, 128)
    cols_bound = numerics.padded_rows_bound(cols, len(sizes), 4)
    assert out.shape == (padded_rows, cols_bound)
    expected = [0] * (padded_rows * cols_bound)
    start = 0
    for g, size in enumerate(sizes):
        group_cols = size // 32
        # FBGEMM: per group round_up(size_i / 32, 4) * round_up(M, 128)
        base = sum(_round_up(sizes[i] // 32, 4) for i in range(g)) * padded_rows
        chunk = brute_blocked(s[:, start : start + group_cols]) if group_cols else []
        expected[base : base + len(chunk)] = chunk
        start += group_cols
    assert out.flatten().tolist() == expected


def test_groups_of_multiples_of_128_make_per_group_equal_global_layout() -> None:
    # research section 2: a single global to_blocked equals the per-group layout only then.
    s = torch.randint(0, 256, (384, 8), dtype=torch.uint8)
    per_group = numerics.to_blocked_m_groups(s, _offsets([128, 0, 256]))
    assert torch.equal(per_group[:384], numerics.to_blocked(s))


def test_layouts_with_no_groups() -> None:
    none = torch.zeros(0, dtype=torch.int32)
    assert not numerics.to_blocked_m_groups(torch.ones(7, 5, dtype=torch.uint8), none).any()
    assert numerics.to_blocked_k_groups(torch.ones(7, 0, dtype=torch.uint8), none).shape == (128, 0)
