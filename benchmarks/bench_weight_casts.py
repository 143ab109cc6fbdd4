"""A weight's casts for one training step on sm90, 1x32 blocks against 32x32 tiles.

Each expert weight is read by the forward along K and by the dgrad along N, so a step casts it
in both orientations, each rebased to one scale per contraction row. ``1x32``
(``Config.weight_blocks``' default): the row kernel on the weight as stored, and the column
kernels (amax, then cast) on its transposed view. ``32x32``: the tile scales, found on the
weight as stored, then each orientation's cast reads them instead of the weight's maxima (one
read of the weight each). The weight is timed as stored (E, N, K), the forward along its last
dim, and as HF 5.x stores experts, (E, K, N), where the forward reads the transposed view.
Timed with ``triton.testing.do_bench`` (median) over rotating weights; each time is also given
as a multiple of a bf16 copy of the weight in the same run. The kernels' bits are checked by the
tests (``tests/kernel_cases.py``), not here.

    python benchmarks/bench_weight_casts.py --out weights.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from triton.testing import do_bench

from bench_gemms import rotating, run_meta
from mxfp8_compile.lowering import triton_quantize

# (experts, N, K): Llama4-Scout's gate or up projection and down projection, DeepSeek-V3's
WEIGHTS = [(8, 8192, 5120), (8, 5120, 8192), (8, 2048, 7168), (8, 7168, 2048)]
SQUARE_TILES = [(128, 4), (256, 4), (256, 8), (512, 4), (512, 8)]


def _time(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _casts(nxt: Callable[[], torch.Tensor], forward_across: bool, tile: tuple[int, int] | None
           ) -> dict[str, Callable[[], object]]:
    """The two casts of each block shape; ``forward_across``: the forward reads the transposed
    view (an (E, K, N) weight), so the tile-finding cast runs on it."""
    def oriented(w: torch.Tensor, forward: bool) -> torch.Tensor:
        return w.mT if forward == forward_across else w

    def square(w: torch.Tensor, forward: bool, tiles: torch.Tensor) -> object:
        return triton_quantize.quantize_rebase_square(oriented(w, forward), tiles.mT if forward == forward_across else tiles,
                                                      tile=tile)

    def square_all() -> None:
        w = nxt()
        tiles = triton_quantize.square_tile_scales(w, tile=tile)
        square(w, True, tiles)
        square(w, False, tiles)

    tiles = triton_quantize.square_tile_scales(nxt())  # any weight's: the time does not depend on them
    return {
        "1x32 forward": lambda: triton_quantize.quantize_rebase_rows(oriented(nxt(), True)),
        "1x32 dgrad": lambda: triton_quantize.quantize_rebase_rows(oriented(nxt(), False)),
        "1x32 both": lambda: (lambda w: (triton_quantize.quantize_rebase_rows(oriented(w, True)),
                                         triton_quantize.quantize_rebase_rows(oriented(w, False))))(nxt()),
        "32x32 tile scales": lambda: triton_quantize.square_tile_scales(nxt(), tile=tile),
        "32x32 forward": lambda: square(nxt(), True, tiles),
        "32x32 dgrad": lambda: square(nxt(), False, tiles),
        "32x32 all three": square_all,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="also time the square kernel's other tiles")
    args = parser.parse_args()
    meta = run_meta()
    print(meta, flush=True)
    rows = []
    print("| weight (E, N, K) | stored | cast | ms | / bf16 copy | 1x32 both / this |\n|---|---|---|---|---|---|")
    for shape in WEIGHTS:
        nxt = rotating(*shape)
        dst = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        t_copy = _time(lambda: dst.copy_(nxt()))
        for forward_across, stored in ((False, "(E, N, K)"), (True, "(E, K, N)")):
            for tile in [None] + (SQUARE_TILES if args.sweep else []):
                times = {name: _time(fn) for name, fn in _casts(nxt, forward_across, tile).items()
                         if tile is None or name.startswith("32x32")}
                if tile is None:
                    both = times["1x32 both"]
                for name, t in times.items():
                    label = name if tile is None else f"{name}, tile {tile[0]} / {tile[1]} warps"
                    rows.append({"shape": shape, "stored": stored, "cast": label, "ms": t, "copy_ms": t_copy,
                                 "speedup_vs_1x32": both / t if name.endswith(("both", "all three")) else None})
                    ratio = f"{both / t:.2f}x" if name.endswith(("both", "all three")) else ""
                    print(f"| {shape} | {stored} | {label} | {t:.3f} | {t / t_copy:.2f} | {ratio} |", flush=True)
        del nxt, dst
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "weights": rows}, f, indent=1)


if __name__ == "__main__":
    main()
