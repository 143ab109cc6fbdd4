"""Inputs for the Triton cast kernels, and the bit-exact check against numerics: shared by the
GPU tests and the interpreter run in CI (``python kernel_cases.py cpu``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from mx_cases import CASES
from mxfp8_compile import numerics


def inputs(device: str, large: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def wide(*shape: int) -> torch.Tensor:  # a random binade per row, fp32 subnormal to huge
        rows = torch.randn(*shape, generator=g)
        return rows * torch.exp2(torch.randint(-135, 110, (*shape[:-1], 1), generator=g).float())

    cases = [
        torch.cat([c.tensor().float() for c in CASES]),
        torch.cat([c.tensor() for c in CASES if c.dtype == torch.bfloat16]),
        torch.randn(5, 96, generator=g).bfloat16(),
        wide(7, 160),
        wide(3, 8192 + 96).bfloat16(),  # longer than one tile: two sweeps
        wide(3, 64, 40).transpose(-2, -1),  # a weight's transposed view, read in place
        wide(1, 96, 33).transpose(-2, -1),  # odd rows, a partial column tile
        wide(2, 256, 128).transpose(-2, -1),
        torch.empty(0, 64),
    ]
    if large:
        cases += [
            torch.randn(4099, 7168, generator=g).bfloat16(),
            wide(8, 512, 1024).bfloat16().transpose(-2, -1),
            (torch.randn(1000, 5120, generator=g) * torch.where(torch.rand(5120, generator=g) < 0.01, 1000.0, 1.0)).bfloat16(),
        ]
    return [c.to(device) for c in cases]


def token_group_inputs(device: str, large: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, offs) pairs: ragged, empty and 1-token groups, tokens past the last group, strided x."""
    g = torch.Generator().manual_seed(1)
    special = torch.cat([c.tensor().float() for c in CASES])  # (n*32,) special values per block
    cases = [
        (torch.randn(200, 96, generator=g).bfloat16(), [0, 1, 33, 33, 64, 150]),
        (torch.randn(96, 40, generator=g).t() * 1e-30, [0, 31, 32, 40]),  # (40, 96) view, fp32 subnormal
        (special.reshape(-1, 32).t().contiguous(), [7, special.numel() // 32]),
        (special.reshape(-1, 32), [5, special.numel() // 64]),  # special blocks along rows, a tail
        (torch.randn(64, 64, generator=g).bfloat16(), []),
        (torch.randn(0, 32, generator=g), [0, 0]),
    ]
    if large:
        cases += [
            (torch.randn(16384, 7168, generator=g).bfloat16(), torch.linspace(0, 16384, 9)[1:].int().tolist()),
            (torch.randn(8191, 2048, generator=g).bfloat16(), [7000, 7001, 7100, 8191]),  # skewed
        ]
    return [(x.to(device), torch.tensor(offs, dtype=torch.int32, device=device)) for x, offs in cases]


def gather_inputs(device: str, large: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """(src, rows, weights, offs) of the gathered casts: repeated and negative rows, rows past
    the last group, special values, a strided fp32 source, bf16 and fp32 weights with zeros and
    products that overflow to Inf, no rows at all."""
    g = torch.Generator().manual_seed(3)
    special = torch.cat([c.tensor().float() for c in CASES]).reshape(-1, 32)
    weights = torch.rand(40, generator=g) * 4
    weights[[3, 20]] = torch.tensor([0.0, 1e30])
    cases = [
        (torch.randn(30, 96, generator=g).bfloat16(), torch.randint(-30, 30, (40,), generator=g), None, [0, 1, 33, 33]),
        (torch.randn(30, 96, generator=g).bfloat16(), torch.randint(0, 30, (40,), generator=g), weights.bfloat16(), [5, 40]),
        (torch.randn(30, 64, generator=g).half(), torch.randint(0, 30, (40,), generator=g, dtype=torch.int32), weights,
         [20, 39]),
        (special, torch.randperm(special.shape[0], generator=g), weights[: special.shape[0]], [7, special.shape[0]]),
        (torch.randn(96, 40, generator=g).t() * 1e-30, torch.tensor([0, 39, -1, 5, 5]), weights[:5].bfloat16(), [2, 5]),
        (torch.randn(10, 64, generator=g).bfloat16(), torch.zeros(0, dtype=torch.int64), None, [0, 0]),
    ]
    if large:
        cases.append((torch.randn(16384, 7168, generator=g).bfloat16(), torch.randperm(16384, generator=g),
                      torch.rand(16384, generator=g).bfloat16(), torch.linspace(0, 16384, 9)[1:].int().tolist()))
    return [(src.to(device), rows.to(device), None if w is None else w.to(device),
             torch.tensor(offs, dtype=torch.int32, device=device)) for src, rows, w, offs in cases]


def _gather_mismatches(device: str, large: bool, mode: str) -> list[str | None]:
    """The casts reading their rows through a gather (sm90's rebased pair, sm100's one kernel)
    against numerics on ``numerics.gather_rows``; the row cast also in two sweeps (a 32-wide
    tile), as rows longer than one tile take it."""
    from mxfp8_compile.lowering.triton_quantize import (
        RowSource,
        quantize_rebase_rows,
        quantize_rebase_token_groups,
        quantize_rows_and_token_groups,
    )

    failures = []
    # on the GPU the default tiles; under the interpreter, whose time goes by the program, 8 rows a program
    one_read, two_sweeps = (None, (1, 32, 1)) if device == "cuda" else ((8, 128, 1), (8, 32, 1))
    for src, rows, weights, offs in gather_inputs(device, large):
        x = numerics.gather_rows(src.cpu(), rows.cpu(), None if weights is None else weights.cpu())
        what = f"gathered {len(rows)} rows{'' if weights is None else ' weighted ' + str(weights.dtype)} {mode}"
        source = RowSource(rows, weights)
        got = (*quantize_rebase_rows(src, mode, tile=one_read, source=source),
               *quantize_rebase_token_groups(src, offs, mode, source=source))
        rq, rs, rpo = numerics.to_mx_token_groups(x, offs.cpu(), mode=mode)
        rebased = numerics.rebase_token_groups(rq, rs, rpo)
        want = (*numerics.rebase_rowwise(*numerics.to_mx(x, mode=mode), dim=-1), rebased[0].t(), rebased[1], rpo)
        failures += _parts_mismatch(f"{what} rebased", src, got, want)
        swept = quantize_rebase_rows(src, mode, tile=two_sweeps, source=source)
        failures += _parts_mismatch(f"{what} rebased in two sweeps", src, swept, want[:2])
        want = (*numerics.to_mx(x, mode=mode), rq.t(), rs.t(), rpo)
        failures += _parts_mismatch(f"{what} MX", src, quantize_rows_and_token_groups(src, offs, mode, source=source), want)
    return failures


def square_inputs(device: str, large: bool) -> list[torch.Tensor]:
    """Weights for the 32x32-tile casts: special values in some tiles, a binade per row (tile
    scales apart within a strip: shifts into e4m3's subnormals), transposed views, widths past
    one (32, BLOCK_C) tile with a partial last one, batch dims that do not flatten to a view."""
    g = torch.Generator().manual_seed(2)
    special = torch.cat([c.tensor().float() for c in CASES]).reshape(-1, 32)  # one special block a row
    with_special = torch.randn(64, 3 * 32, generator=g)
    with_special[: special.shape[0], 32:64] = special
    rows = torch.randn(4, 96, 352, generator=g) * torch.exp2(torch.randint(-130, 100, (4, 96, 1), generator=g).float())
    cases = [
        with_special,
        with_special.bfloat16(),
        rows.bfloat16(),
        rows.transpose(-2, -1),  # a weight read along N: its transposed view, in place
        torch.randn(32, 5, 64, generator=g).permute(1, 2, 0)[..., :32],  # (5, 64, 32), strided
        torch.randn(3, 2, 64, 32, generator=g).transpose(0, 1),  # batch dims that do not flatten
        torch.empty(0, 64, 32),
    ]
    if large:
        cases += [torch.randn(4, 1024, 5120, generator=g).bfloat16(),
                  torch.randn(4, 2048, 1024, generator=g).bfloat16().transpose(-2, -1)]
    return [c.to(device) for c in cases]


def _square_mismatches(device: str, large: bool, mode: str) -> list[str | None]:
    """The 32x32-tile kernels against numerics: the tile scales, then both orientations (x, and
    its transposed view with the tile scales transposed) rebased with them."""
    from mxfp8_compile.lowering.triton_quantize import quantize_rebase_square, square_tile_scales

    failures = []
    for x in square_inputs(device, large):
        q, tiles = numerics.to_mx_square(x.cpu(), mode=mode)
        got_tiles = square_tile_scales(x, mode)
        failures.append(_byte_mismatch(f"square {mode} tile scales", x, got_tiles, tiles))
        for dim, view, view_tiles in ((-1, x, got_tiles), (-2, x.mT, got_tiles.mT)):
            rq, rs = numerics.rebase_square(q, tiles, dim=dim)
            got = quantize_rebase_square(view, view_tiles)
            failures += [_byte_mismatch(f"square along {dim} {mode} {part}", x, g, w)
                         for part, g, w in zip(("data", "row scales"), got, (rq.movedim(dim, -1), rs), strict=True)]
    return failures


def _byte_mismatch(what: str, x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> str | None:
    got, want = got.cpu().view(torch.uint8), want.view(torch.uint8)
    if torch.equal(got, want):
        return None
    bad = (got != want).nonzero()[:3].tolist()
    examples = [f"{got[tuple(i)].item():#x} vs {want[tuple(i)].item():#x}" for i in bad]
    return f"{what} {tuple(x.shape)} {x.dtype}: {int((got != want).sum())} bytes differ at {bad}: {examples}"


def _parts_mismatch(what: str, x: torch.Tensor, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> list[str | None]:
    """``_byte_mismatch`` of each output of a cast returning (row data, row scales, token-group
    data, their scales, padded offsets)."""
    parts = ("row data", "row scales", "token-group data", "token-group scales", "padded offsets")
    return [_byte_mismatch(f"{what} {part}", x, g, w) for part, g, w in zip(parts[: len(want)], got, want, strict=True)]


@contextlib.contextmanager
def _poisoned_allocations() -> Iterator[None]:
    """Every ``torch.empty`` filled with 0xA5 bytes: an output byte a kernel never writes then
    shows, where the caching allocator would hand back a block holding an earlier right answer."""
    empty = torch.empty

    def poisoned(*args, **kwargs) -> torch.Tensor:
        t = empty(*args, **kwargs)
        t.reshape(-1).view(torch.uint8).fill_(0xA5)
        return t

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = empty


def mismatches(device: str, large: bool = False) -> list[str]:
    """Every difference between the Triton kernels and numerics, as readable lines."""
    with _poisoned_allocations():
        return _mismatches(device, large)


def _mismatches(device: str, large: bool) -> list[str]:
    from mxfp8_compile.lowering.triton_quantize import (
        quantize_rebase_rows,
        quantize_rebase_token_groups,
        quantize_rows,
        quantize_rows_and_token_groups,
        quantize_token_groups,
    )

    failures = []
    for mode in ("rceil", "floor"):
        for x in inputs(device, large):
            q, s = quantize_rebase_rows(x, mode)
            rq, rs = numerics.rebase_rowwise(*numerics.to_mx(x.cpu(), mode=mode), dim=-1)
            failures += [_byte_mismatch(f"rows {mode} data", x, q, rq), _byte_mismatch(f"rows {mode} scales", x, s, rs)]
            q, s = quantize_rows(x, mode)
            rq, rs = numerics.to_mx(x.cpu(), mode=mode)
            failures += [_byte_mismatch(f"MX rows {mode} data", x, q, rq), _byte_mismatch(f"MX rows {mode} scales", x, s, rs)]
        for x, offs in token_group_inputs(device, large):
            q, s, po = quantize_rebase_token_groups(x, offs, mode)
            rq, rs, rpo = numerics.to_mx_token_groups(x.cpu(), offs.cpu(), mode=mode)
            transposed = (rq.t(), rs.t(), rpo)  # the sm100 wgrad's layout, tokens contiguous
            for layout, want in (("", (rq, rs, rpo)), (" transposed", transposed)):
                got = quantize_token_groups(x, offs, mode, tokens_contiguous=bool(layout))
                failures += [_byte_mismatch(f"MX token groups{layout} {offs.tolist()} {mode} {part}", x, g, w)
                             for part, g, w in zip(("data", "scales", "padded offsets"), got, want, strict=True)]
            rq, rs = numerics.rebase_token_groups(rq, rs, rpo)
            failures += [
                _byte_mismatch(f"token groups {offs.tolist()} {mode} data", x, q, rq.t()),
                _byte_mismatch(f"token groups {offs.tolist()} {mode} scales", x, s, rs),
                _byte_mismatch(f"token groups {offs.tolist()} {mode} padded offsets", x, po, rpo),
            ]
            if x.shape[1] % 32:  # token groups only: no row blocks
                continue
            want = (*numerics.to_mx(x.cpu(), mode=mode), *transposed)
            failures += _parts_mismatch(f"MX rows and token groups {offs.tolist()} {mode}", x,
                                        quantize_rows_and_token_groups(x, offs, mode), want)
        failures += _square_mismatches(device, large, mode)
    # the gather is the same for both modes: one suffices (the interpreter's time is CI's)
    failures += _gather_mismatches(device, large, "rceil")
    return [f for f in failures if f]


if __name__ == "__main__":
    bad = mismatches(sys.argv[1])
    print("MISMATCH: " + "; ".join(bad) if bad else "all bit-exact")
