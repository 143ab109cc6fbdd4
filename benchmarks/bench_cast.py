"""Cast kernels: bytes moved per second against a device-to-device copy in the same run.

Bytes moved = what the kernel must read (bf16 input) plus write (e4m3 data and scale bytes),
once each. Timed with ``triton.testing.do_bench`` (median) over rotating inputs.

    python benchmarks/bench_cast.py --out cast.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
from triton.testing import do_bench

from mxfp8_compile import ops

SHAPES = [(16384, 5120), (32768, 5120), (65536, 7168), (16384, 7168)]
ROTATING = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes of the kernel")
    args = parser.parse_args()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}
    print(meta, flush=True)
    rows = []
    for m, k in SHAPES:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATING)]
        dst = torch.empty_like(xs[0])
        i = {"i": 0}

        def nxt() -> torch.Tensor:
            i["i"] = (i["i"] + 1) % ROTATING
            return xs[i["i"]]

        t_copy = do_bench(lambda: dst.copy_(nxt()), return_mode="median")
        t_cast = do_bench(lambda: ops.quantize_rebase(nxt()), return_mode="median")
        if args.sweep:  # tile shapes of the kernel, for choosing its defaults
            from mxfp8_compile.lowering.triton_quantize import quantize_rebase_rows

            for block_r, block_k, warps in [(8, 512, 4), (4, 512, 4), (2, 1024, 4), (1, 1024, 4), (1, 4096, 4), (1, 2048, 8)]:
                t = do_bench(lambda: quantize_rebase_rows(nxt(), block_r=block_r, block_k=block_k, num_warps=warps),
                             return_mode="median")
                print(f"   BLOCK_R {block_r:2d} BLOCK_K {block_k:4d} warps {warps}: {t:.3f} ms, "
                      f"{(m * k * 3 + m) / t / 1e9:.2f} TB/s", flush=True)
        copy_bw = 2 * m * k * 2 / t_copy / 1e9  # TB/s: read + write
        cast_bw = (m * k * 2 + m * k + m) / t_cast / 1e9
        row = {"M": m, "K": k, "copy_ms": t_copy, "copy_TBps": copy_bw, "quantize_rebase_ms": t_cast,
               "quantize_rebase_TBps": cast_bw, "fraction_of_copy": cast_bw / copy_bw}
        rows.append(row)
        print(f"{m:6d} x {k:5d}: copy {copy_bw:.2f} TB/s | quantize_rebase (1x32 + rowwise rebase) "
              f"{t_cast:.3f} ms, {cast_bw:.2f} TB/s = {cast_bw / copy_bw:.0%} of copy", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cast": rows}, f, indent=1)


if __name__ == "__main__":
    main()
