"""Measure what the sm90 cost model is built from, and what it must predict.

Three sections, each a list of rows in the JSON written to ``--out``:

* ``gemms``: the GEMMs alone on a grid (tokens T, contraction K, output N, 8 experts with
  uniform groups): bf16 and FP8 rowwise (fast accumulation, as ``Config.fast_accum`` defaults;
  exact accumulation at a few shapes) for the grouped forward (2Dx3D), the grouped wgrad
  (2Dx2D, contraction over each group's tokens) and a dense linear's forward and wgrad (the
  contraction over tokens); the grouped dgrad at a few shapes, to see whether its layout (B as
  stored, not transposed) changes its speed.
* ``casts``: each cast kernel the sm90 rewrite runs, on activations (T, K) and expert weights
  (E, N, K): rows (``quantize_rebase`` of contiguous rows), rows of a transposed view (a weight's
  dgrad cast, a dense wgrad's operands), token groups (``quantize_rebase_token_groups``), and
  the scale decoding (``e8m0_to_fp32``, compiled as Inductor fuses it in the graph).
* ``composed``: each role as the rewrite runs it (both operand casts, the decoding and the FP8
  GEMM) against its bf16 GEMM, on shapes partly off the grid: the cost model's check.

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``) over rotating
inputs, so they are the GPU's time, without host launch overhead.

    python benchmarks/calibrate_costs.py --out costs.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable

import torch
from triton.testing import do_bench_cudagraph

from bench_gemms import group_ends, rotating, run_meta
from mxfp8_compile import numerics, ops

TOKENS = (2048, 8192, 32768, 131072)
DIMS = (512, 1024, 2048, 4096, 8192)
ONE_TOKEN_COUNT = 32768  # where exact accumulation and the dgrad are timed, at K and N in SOME_DIMS
SOME_DIMS = (1024, 4096)
CHECK_DIMS = ((768, 1536), (1536, 768), (1024, 1024), (4096, 4096), (5120, 8192), (8192, 5120), (7168, 2048),
              (2048, 7168), (512, 8192), (8192, 512), (3072, 1024))
EXPERTS = 8
BF16 = torch.bfloat16
decode = torch.compile(numerics.e8m0_to_fp32, dynamic=True)


def _time(fn: Callable[[], object], rep: int) -> float:
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


def rebased(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    data, scales = ops.quantize_rebase(x)
    return data, decode(scales)


def token_groups(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data, scales, padded = ops.quantize_rebase_token_groups(x, offs)
    return data, decode(scales), padded


class Problem:
    """The tensors of one (T, K, N) shape: activations x (T, K) and dy (T, N) rotating, expert
    weights (E, N, K) and a dense weight (N, K), and each role's bf16 GEMM, its casts and its
    FP8 GEMM (``fp8(role)`` takes the cast operands)."""

    def __init__(self, tokens: int, k: int, n: int, experts: int = EXPERTS) -> None:
        self.tokens, self.k, self.n, self.experts = tokens, k, n, experts
        self.offs = group_ends(tokens, experts, "uniform")
        self.x, self.dy = rotating(tokens, k), rotating(tokens, n)
        self.w = torch.randn(experts, n, k, device="cuda", dtype=BF16) * 0.02
        self.w2 = torch.randn(n, k, device="cuda", dtype=BF16) * 0.02

    def bf16(self, role: str) -> Callable[[], torch.Tensor]:
        x, dy, w, w2, offs = self.x, self.dy, self.w, self.w2, self.offs
        return {
            "grouped forward": lambda: torch._grouped_mm(x(), w.mT, offs=offs),
            "grouped dgrad": lambda: torch._grouped_mm(dy(), w, offs=offs),
            "grouped wgrad": lambda: torch._grouped_mm(dy().t(), x(), offs=offs),
            "dense forward": lambda: x() @ w2.t(),
            "dense dgrad": lambda: dy() @ w2,
            "dense wgrad": lambda: dy().t() @ x(),
        }[role]

    def cast(self, role: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        """The rewrite's casts of ``role``'s operands: ``(A, its scales, B^T, its scales)`` and
        the offsets for grouped roles."""
        x, dy, w, w2, offs = self.x, self.dy, self.w, self.w2, self.offs
        return {
            "grouped forward": lambda: (*rebased(x()), *rebased(w), offs),
            "grouped dgrad": lambda: (*rebased(dy()), *rebased(w.mT), offs),
            "grouped wgrad": lambda: (*token_groups(dy(), offs)[:2], *token_groups(x(), offs)),
            "dense forward": lambda: (*rebased(x()), *rebased(w2)),
            "dense dgrad": lambda: (*rebased(dy()), *rebased(w2.t())),
            "dense wgrad": lambda: (*rebased(dy().t()), *rebased(x().t())),
        }[role]

    @staticmethod
    def fp8(role: str, fast_accum: bool = True) -> Callable[..., torch.Tensor]:
        if role.startswith("dense"):
            return lambda a, sa, bt, sb: ops.scaled_mm_rowwise(a, sa, bt.t(), sb, BF16, fast_accum)
        return lambda a, sa, bt, sb, offs: ops.scaled_grouped_mm_rowwise(a, sa, bt.mT, sb, offs, BF16, fast_accum)


def gemm_rows(p: Problem, rep: int) -> list[dict]:
    rows = []
    some = p.tokens == ONE_TOKEN_COUNT and p.k in SOME_DIMS and p.n in SOME_DIMS
    roles = ["grouped forward", "grouped wgrad", "dense forward", "dense wgrad"] + (["grouped dgrad"] if some else [])
    for role in roles:
        prepared = [p.cast(role)() for _ in range(3)]  # rotating FP8 operands
        turn = itertools.cycle(prepared)
        gemm = p.fp8(role)
        times = {"bf16": _time(p.bf16(role), rep), "fp8": _time(lambda: gemm(*next(turn)), rep)}
        if some:
            exact = p.fp8(role, fast_accum=False)
            times["fp8_exact"] = _time(lambda: exact(*next(turn)), rep)
        for dtype, ms in times.items():
            rows.append({"role": role, "dtype": dtype, "T": p.tokens, "K": p.k, "N": p.n, "E": p.experts, "ms": ms})
        del prepared, turn
    return rows


def cast_rows(tokens: int, k: int, experts: int, rep: int) -> list[dict]:
    """The casts of an activation (T, K): along K, along T (a transposed view), per token group."""
    x, offs = rotating(tokens, k), group_ends(tokens, experts, "uniform")
    timed = {
        "rows": (lambda: ops.quantize_rebase(x()), (tokens, k)),
        "transposed view": (lambda: ops.quantize_rebase(x().t()), (k, tokens)),
        "token groups": (lambda: ops.quantize_rebase_token_groups(x(), offs), (tokens, k)),
    }
    rows = []
    for kind, (fn, shape) in timed.items():
        rows.append({"kind": kind, "rows": shape[0], "width": shape[1], "ms": _time(fn, rep)})
    return rows


def weight_cast_rows(experts: int, n: int, k: int, rep: int) -> list[dict]:
    w = torch.randn(experts, n, k, device="cuda", dtype=BF16)
    timed = {"weight rows": (lambda: ops.quantize_rebase(w), (experts * n, k)),
             "weight transposed view": (lambda: ops.quantize_rebase(w.mT), (experts * k, n))}
    return [{"kind": kind, "rows": shape[0], "width": shape[1], "experts": experts, "ms": _time(fn, rep)}
            for kind, (fn, shape) in timed.items()]


def decode_rows(rep: int) -> list[dict]:
    out = []
    for numel in (1024, 16384, 131072, 1 << 20):
        s = torch.randint(100, 140, (numel,), device="cuda", dtype=torch.uint8)
        out.append({"kind": "decode", "numel": numel, "ms": _time(lambda: decode(s), rep)})
    return out


def composed_rows(p: Problem, rep: int) -> list[dict]:
    rows = []
    for role in ("grouped forward", "grouped dgrad", "grouped wgrad", "dense forward", "dense dgrad", "dense wgrad"):
        cast, gemm = p.cast(role), p.fp8(role)
        bf16, fp8 = _time(p.bf16(role), rep), _time(lambda: gemm(*cast()), rep)
        rows.append({"role": role, "T": p.tokens, "K": p.k, "N": p.n, "E": p.experts, "ms_bf16": bf16,
                     "ms_fp8_with_casts": fp8, "speedup": bf16 / fp8})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rep", type=int, default=10, help="ms of replays per timing (each median of 10)")
    parser.add_argument("--sections", nargs="+", default=["casts", "gemms", "composed"],
                        choices=["composed", "casts", "gemms"])
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    result = {"meta": run_meta(experts=EXPERTS, rep_ms=args.rep)}
    start = time.time()

    def save(section: str, rows: list[dict]) -> None:
        result.setdefault(section, []).extend(rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"[{time.time() - start:6.1f} s] {section}: {rows[-1]}", flush=True)

    for section in args.sections:
        if section == "composed":
            for tokens, (k, n) in itertools.product(TOKENS, CHECK_DIMS):
                save(section, composed_rows(Problem(tokens, k, n), args.rep))
                torch.cuda.empty_cache()
            for experts, tokens, (k, n) in itertools.product((32,), (8192, 32768), CHECK_DIMS[:4]):
                save(section, composed_rows(Problem(tokens, k, n, experts), args.rep))
        elif section == "casts":
            save(section, decode_rows(args.rep))
            for tokens, k in itertools.product(TOKENS, DIMS):
                save(section, cast_rows(tokens, k, EXPERTS, args.rep))
            for n, k in itertools.product(DIMS, DIMS):
                save(section, weight_cast_rows(EXPERTS, n, k, args.rep))
            torch.cuda.empty_cache()
        else:
            for tokens, k, n in itertools.product(TOKENS, DIMS, DIMS):
                save(section, gemm_rows(Problem(tokens, k, n), args.rep))
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
