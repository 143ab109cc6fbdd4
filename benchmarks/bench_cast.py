"""Cast kernels: bytes moved per second against a device-to-device copy in the same run.

Bytes moved = what the kernel must read (bf16 input) plus write (e4m3 data and scale bytes),
once each. Kernels: ``quantize_rebase`` of a row-major activation (the forward's x) and of a
transposed view (a weight cast along its other dim, for dgrad); ``quantize_rebase_token_groups``
(the wgrad's operands, 8 groups, uniform or skewed); both casts of one activation (the
forward's x or the dgrad's dy) one after the other, as the sm90 target runs them, its bytes
counted as if x were read once; ``quantize_rows_and_token_groups``, the same two casts without
the rebase (the sm100 target's MX operands) in one kernel and one read; the MX token-group
cast written (Mp, K), tokens contiguous (K, Mp) as the sm100 wgrad reads it, and (Mp, K)
followed by the fp8 transpose copy the sm100 wgrad made before. Timed with
``triton.testing.do_bench`` (median) over rotating inputs.

    python benchmarks/bench_cast.py --sweep --out cast.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from triton.testing import do_bench

from bench_gemms import group_ends, rotating, run_meta
from mxfp8_compile import ops
from mxfp8_compile.lowering import triton_quantize
from mxfp8_compile.numerics import padded_rows_bound

SHAPES = [(16384, 5120), (32768, 5120), (65536, 7168), (16384, 7168), (16384, 2048)]
# tiles tried by --sweep: (BLOCK_R, BLOCK_K, warps) of the row kernel, (BLOCK_M, BLOCK_K, warps)
# of the column kernel (token groups; transposed views use its default)
ROW_TILES = [(1, 2048, 4), (1, 8192, 4), (1, 8192, 8), (1, 8192, 16), (2, 8192, 16)]
COLUMN_TILES = [(128, 64, 4), (32, 32, 1), (32, 64, 1), (64, 64, 1), (32, 128, 1), (64, 32, 1), (32, 64, 2), (32, 128, 2)]
# (BLOCK_K, warps) of the MX rows-and-token-groups kernel
MX_BOTH_TILES = [(64, 1), (64, 2), (128, 1), (128, 2), (128, 4), (256, 4), (256, 8)]


def _time(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes of the kernels")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="MxK",
                        help="the shapes to time, e.g. 16384x768 (default: SHAPES)")
    args = parser.parse_args()
    meta = run_meta()
    print(meta, flush=True)
    rows = []
    print("| kernel | M x K | copy TB/s | ms | TB/s | of copy |\n|---|---|---|---|---|---|")
    shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes] if args.shapes else SHAPES
    for m, k in shapes:
        nxt = rotating(m, k)
        dst = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
        copy_bw = 2 * m * k * 2 / _time(lambda: dst.copy_(nxt())) / 1e9  # TB/s: read + write
        row_bytes = m * k * 2 + m * k + m
        kernels: dict[str, tuple[Callable[..., object], float, list]] = {
            "quantize_rebase rows": (
                lambda tile=None: triton_quantize.quantize_rebase_rows(nxt(), tile=tile), row_bytes, ROW_TILES),
            "quantize_rebase transposed view": (lambda: triton_quantize.quantize_rebase_rows(nxt().t()), row_bytes, []),
        }
        for routing in ("uniform", "skewed"):
            offs = group_ends(m, 8, routing)
            group_bytes = m * k * 2 + padded_rows_bound(m, 8, 32) * k + 8 * k
            kernels[f"quantize_rebase_token_groups {routing}"] = (
                lambda tile=None, offs=offs: triton_quantize.quantize_rebase_token_groups(nxt(), offs, tile=tile),
                group_bytes, COLUMN_TILES)
            mx_bytes = m * k * 2 + m * k + m * k // 32 + padded_rows_bound(m, 8, 32) * k * 33 // 32
            tokens_bytes = m * k * 2 + padded_rows_bound(m, 8, 32) * k * 33 // 32
            for layout, contiguous in (("(Mp, K)", False), ("tokens contiguous (K, Mp)", True)):
                kernels[f"MX token groups {layout}, {routing}"] = (
                    lambda tile=None, offs=offs, contiguous=contiguous: triton_quantize.quantize_token_groups(
                        nxt(), offs, tile=tile, tokens_contiguous=contiguous), tokens_bytes, MX_BOTH_TILES)
            # what the sm100 wgrad ran before its cast wrote tokens contiguous: the (Mp, K) cast,
            # then the fp8 copy into the layout torch's MX GEMM reads (bytes counted as the cast's)
            kernels[f"MX token groups (Mp, K), then the fp8 transpose copy, {routing}"] = (
                lambda offs=offs: triton_quantize.quantize_token_groups(nxt(), offs)[0].t().contiguous(),
                tokens_bytes, [])
            kernels[f"MX rows and token groups, one kernel, {routing}"] = (
                lambda tile=None, offs=offs: triton_quantize.quantize_rows_and_token_groups(nxt(), offs, tile=tile),
                mx_bytes, MX_BOTH_TILES)
            kernels[f"rows, then token groups, {routing}"] = (
                lambda offs=offs: (lambda x: (triton_quantize.quantize_rebase_rows(x),
                                              triton_quantize.quantize_rebase_token_groups(x, offs)))(nxt()),
                row_bytes + group_bytes - m * k * 2, [])
        for name, (run, moved, tiles) in kernels.items():
            t = _time(run)
            bw = moved / t / 1e9
            rows.append({"kernel": name, "M": m, "K": k, "copy_TBps": copy_bw, "ms": t, "TBps": bw,
                         "fraction_of_copy": bw / copy_bw})
            print(f"| {name} | {m} x {k} | {copy_bw:.2f} | {t:.3f} | {bw:.2f} | {bw / copy_bw:.0%} |", flush=True)
            if args.sweep:  # for choosing the kernels' default tiles
                for tile in tiles:
                    ts = _time(lambda: run(tile))
                    print(f"|   tile {'x'.join(map(str, tile[:-1]))}, {tile[-1]} warps | | | {ts:.3f} | {moved / ts / 1e9:.2f} | "
                          f"{moved / ts / 1e9 / copy_bw:.0%} |", flush=True)
        del nxt, dst
    # the op dispatches to the same kernel: check nothing is lost on the way
    x = torch.randn(16384, 5120, device="cuda", dtype=torch.bfloat16)
    t_op, t_kernel = _time(lambda: ops.quantize_rebase(x)), _time(lambda: triton_quantize.quantize_rebase_rows(x))
    print(f"op vs kernel (16384 x 5120): {t_op:.3f} vs {t_kernel:.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cast": rows}, f, indent=1)


if __name__ == "__main__":
    main()
