"""GEMMs of a MoE layer and a dense linear: the sm90 path, operand preparation included, against bf16.

For each role, the bf16 GEMM (``torch._grouped_mm`` / ``mm``) against what the plugin's sm90 rewrite
runs for it: the fused cast kernels on both operands, then the FP8 rowwise GEMM
(``mxfp8::scaled_grouped_mm_rowwise`` / ``scaled_mm_rowwise``); and that GEMM alone on prepared
operands. Roles of ``y = x W^T`` with ``x`` (M, K) and expert weights ``W`` (E, N, K):

    forward  y  = x  W^T     2Dx3D, A = x along K,        B^T = W (E, N, K) as stored
    dgrad    dx = dy W       2Dx3D, A = dy along N,       B^T = W^T, a transposed view of W
    wgrad    dW = dy^T x     2Dx2D, both along tokens per group (the token-group cast kernel)

Routing: ``uniform`` (equal groups) or ``skewed`` (group sizes proportional to 1/(rank+1), so the
first expert gets about a third of the tokens). Dense: attention projection shapes, ``x`` (M, K)
by ``W`` (K, K). Medians over rotating inputs after warm-up, two ways: CUDA-graph replay
(``triton.testing.do_bench_cudagraph``: the GPU's time, what a step compiled with
``mode="reduce-overhead"`` sees; the ratios) and eager launches (``do_bench``: the custom ops'
host overhead included, what the default mode sees, for the FP8 path with preparation).

    python benchmarks/bench_gemms.py --tokens 16384 65536 --out gemms.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from mxfp8_compile import numerics, ops

SHAPES = {  # expert GEMMs (dim K, expert hidden N); dense: attention projections (K x K)
    "llama4_scout": dict(dim=5120, expert_hidden=8192),
    "deepseek_v3": dict(dim=7168, expert_hidden=2048),
    "train_moe": dict(dim=768, expert_hidden=1536),  # train_moe.py's default preset (not by default)
}
DEFAULT_SHAPES = ["llama4_scout", "deepseek_v3"]
ROTATING = 3
BF16 = torch.bfloat16


def group_ends(tokens: int, experts: int, routing: str) -> torch.Tensor:
    """int32 end offsets of ``experts`` token groups summing to ``tokens``."""
    weights = torch.ones(experts) if routing == "uniform" else 1.0 / torch.arange(1, experts + 1)
    sizes = (weights / weights.sum() * tokens).floor().long()
    sizes[0] += tokens - sizes.sum()
    return torch.cumsum(sizes, 0).to(device="cuda", dtype=torch.int32)


def run_meta(**extra: object) -> dict:
    """Where and when a benchmark ran: the device, torch, triton and the date, and ``extra``."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), **extra}


def rotating(*shape: int, scale: float = 1.0) -> Callable[[], torch.Tensor]:
    """A function returning the next of ``ROTATING`` random bf16 tensors of ``shape`` on the GPU,
    so that timed runs read from memory, not from L2."""
    tensors = [torch.randn(*shape, device="cuda", dtype=BF16) * scale for _ in range(ROTATING)]
    state = {"i": 0}

    def nxt() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % ROTATING
        return tensors[state["i"]]

    return nxt


def rowwise(op: Callable[..., tuple[torch.Tensor, ...]], *args: object) -> tuple[torch.Tensor, ...]:
    """``op``'s outputs with its E8M0 scale bytes (second output) decoded to the fp32 the rowwise
    GEMMs read: what the rewrite does in the graph, here one more kernel."""
    data, scales, *rest = op(*args)
    return data, numerics.e8m0_to_fp32(scales), *rest


def _time(fn: Callable[[], object]) -> float:
    return do_bench_cudagraph(fn, rep=300, return_mode="median")


def _time_eager(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def expert_gemms(shape: str, tokens: int, experts: int, routing: str, fast_accum: bool) -> list[dict]:
    k, n = SHAPES[shape]["dim"], SHAPES[shape]["expert_hidden"]
    offs = group_ends(tokens, experts, routing)
    x, dy_fwd, dy_bwd = rotating(tokens, k), rotating(tokens, n), rotating(tokens, n)
    w = torch.randn(experts, n, k, device="cuda", dtype=BF16) * 0.02

    def prepared(role: str) -> tuple[torch.Tensor, ...]:
        """The rowwise GEMM's operands for ``role``, cast from the next inputs: (A, its scales,
        B^T, its scales, offsets)."""
        if role == "wgrad":
            rd, sd, po = rowwise(ops.quantize_rebase_token_groups, dy_bwd(), offs)
            rxt, sx, _ = rowwise(ops.quantize_rebase_token_groups, x(), offs)
            return rd, sd, rxt, sx, po
        # forward: B^T = W (E, N, K) as stored; dgrad: B = W, so B^T is W's transpose, cast along N
        a, w_t = (x(), w) if role == "forward" else (dy_bwd(), w.mT)
        return (*rowwise(ops.quantize_rebase, a), *rowwise(ops.quantize_rebase, w_t), offs)

    def gemm(a: torch.Tensor, sa: torch.Tensor, bt: torch.Tensor, sb: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return ops.scaled_grouped_mm_rowwise(a, sa, bt.mT, sb, o, BF16, fast_accum)

    baselines = {
        "forward": lambda: torch._grouped_mm(x(), w.mT, offs=offs),
        "dgrad": lambda: torch._grouped_mm(dy_bwd(), w, offs=offs),
        "wgrad": lambda: torch._grouped_mm(dy_fwd().t(), x(), offs=offs),
    }
    rows = []
    for role, bf16 in baselines.items():
        ready = prepared(role)  # for the GEMM alone
        with_preparation = lambda: gemm(*prepared(role))  # noqa: E731
        t_bf16, t_fp8, t_gemm = _time(bf16), _time(with_preparation), _time(lambda: gemm(*ready))
        rows.append({"kind": "grouped", "shape": shape, "role": role, "routing": routing, "tokens": tokens,
                     "K": k, "N": n, "experts": experts, "ms_bf16": t_bf16, "ms_fp8_with_preparation": t_fp8,
                     "ms_fp8_with_preparation_eager": _time_eager(with_preparation), "ms_fp8_gemm_only": t_gemm,
                     "speedup_with_preparation": t_bf16 / t_fp8, "speedup_gemm_only": t_bf16 / t_gemm, "tflops_bf16": 2 * tokens * k * n / t_bf16 / 1e9})
    return rows


def dense_gemms(shape: str, tokens: int, fast_accum: bool) -> list[dict]:
    k = SHAPES[shape]["dim"]
    x, dy = rotating(tokens, k), rotating(tokens, k)
    w = torch.randn(k, k, device="cuda", dtype=BF16) * 0.02  # nn.Linear weight (out, in)

    def fp8(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:  # a (M, K) @ b (K, N), b_t = b^T
        ra, sa = rowwise(ops.quantize_rebase, a)
        rbt, sb = rowwise(ops.quantize_rebase, b_t)
        return ops.scaled_mm_rowwise(ra, sa, rbt.t(), sb, BF16, fast_accum)

    roles = {
        "forward": (lambda: x() @ w.t(), lambda: fp8(x(), w)),
        "dgrad": (lambda: dy() @ w, lambda: fp8(dy(), w.t())),
        "wgrad": (lambda: dy().t() @ x(), lambda: fp8(dy().t(), x().t())),
    }
    rows = []
    for role, (bf16, mx) in roles.items():
        t_bf16, t_fp8 = _time(bf16), _time(mx)
        rows.append({"kind": "dense", "shape": shape, "role": role, "tokens": tokens, "K": k, "N": k,
                     "ms_bf16": t_bf16, "ms_fp8_with_preparation": t_fp8, "ms_fp8_with_preparation_eager": _time_eager(mx),
                     "speedup_with_preparation": t_bf16 / t_fp8})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--routing", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    parser.add_argument("--fast-accum", action="store_true", help="the FP8 GEMMs with Config.fast_accum")
    parser.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = parser.parse_args()
    meta = run_meta(fast_accum=args.fast_accum)
    print(meta, flush=True)
    print("| kind | shape | tokens | routing | role | bf16 ms | FP8 incl. prep ms | FP8 GEMM only ms | incl. prep | GEMM only "
          "| FP8 incl. prep, eager launches ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        for tokens in args.tokens:
            new = [r for routing in args.routing for r in expert_gemms(shape, tokens, args.experts, routing, args.fast_accum)]
            new += dense_gemms(shape, tokens, args.fast_accum)
            for r in new:
                only = r.get("ms_fp8_gemm_only")
                gemm_only = ("-", "-") if only is None else (f"{only:.3f}", f"{r['speedup_gemm_only']:.2f}x")
                print(f"| {r['kind']} | {shape} | {tokens} | {r.get('routing', '-')} | {r['role']} | {r['ms_bf16']:.3f} | "
                      f"{r['ms_fp8_with_preparation']:.3f} | {gemm_only[0]} | {r['speedup_with_preparation']:.2f}x | "
                      f"{gemm_only[1]} | {r['ms_fp8_with_preparation_eager']:.3f} |", flush=True)
            rows += new
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
