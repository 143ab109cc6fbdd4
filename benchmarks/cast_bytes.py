"""Bytes the sm90 casts of a MoE layer step move, against the rebased floor (a count, not a timing).

The layer of bench_moe_layer.py (top-1, SiLU-gated experts, no shared expert) casts, each step,
every tensor its expert GEMMs read both ways: x and dy (tokens x dim), h, dh1 and dh3 (tokens x
expert hidden) along K for a grouped GEMM and along tokens for its wgrad; each of the three
expert weights (experts x hidden x dim) along K for the forward and along N for the dgrad. An
input byte is one bf16 byte of those tensors, each counted once. Per input byte, as the sm90
kernels are built (lowering/triton_quantize.py):

* along K (a row cast): read 1, write 0.5 (e4m3 is half of bf16; scales are 1/64 of that and
  left out);
* along tokens, or a weight's transposed cast (the column kernels): the amax pass reads 1, the
  cast reads 1 and writes 0.5;

so 4 per input byte. Without ``Config.gathered_casts``, x and dy are first written out by their
token permutation (a gather reads the source and writes the permuted copy: 2 more per input
byte of x and dy). The floor, the least any rebased cast can move (benchmarks/RESULTS.md,
session 10), is 3: one amax pass over each tensor for both orientations, then one read that
writes both. With 32x32 weights on sm90 the weight also moves 4 (the tile scales read it once,
each orientation's cast once).

    python benchmarks/cast_bytes.py [--tokens 16384 32768 65536 131072]
"""

from __future__ import annotations

import argparse

from bench_moe_layer import SHAPES

BF16 = 2
PER_INPUT_BYTE = 4.0  # row cast 1.5 + column casts 2.5
GATHER_PER_INPUT_BYTE = 2.0  # the permuted copy: read the source, write the copy
FLOOR_PER_INPUT_BYTE = 3.0


def layer_cast_bytes(dim: int, expert_hidden: int, experts: int, tokens: int) -> dict[str, float]:
    """Bytes a step: ``input`` (the cast tensors once), ``gathered`` (the casts, reading x and dy
    through their permutations), ``copied`` (the casts plus the permuted copies of x and dy) and
    ``floor``."""
    permuted = 2 * tokens * dim * BF16  # x and dy
    hidden = 3 * tokens * expert_hidden * BF16  # h, dh1, dh3
    weights = 3 * experts * expert_hidden * dim * BF16
    total = permuted + hidden + weights
    return {
        "input": total,
        "gathered": PER_INPUT_BYTE * total,
        "copied": PER_INPUT_BYTE * total + GATHER_PER_INPUT_BYTE * permuted,
        "floor": FLOOR_PER_INPUT_BYTE * total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    print("| shape, tokens | input GB | casts + permuted copies GB (x floor) | gathered casts GB (x floor) | floor GB |")
    print("|---|---|---|---|---|")
    for shape, dims in SHAPES.items():
        for tokens in args.tokens:
            b = layer_cast_bytes(dims["dim"], dims["expert_hidden"], args.experts, tokens)
            print(f"| {shape}, {tokens} | {b['input'] / 1e9:.2f} | {b['copied'] / 1e9:.2f} ({b['copied'] / b['floor']:.2f}x) "
                  f"| {b['gathered'] / 1e9:.2f} ({b['gathered'] / b['floor']:.2f}x) | {b['floor'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
