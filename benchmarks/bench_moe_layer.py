"""A MoE layer forward+backward compiled with ``backend="mxfp8"`` against ``torch.compile`` bf16.

Same run, same shapes, same inputs: router, top-1 routing, SiLU-gated experts through
``torch._grouped_mm``, no shared expert. Timed with ``triton.testing.do_bench`` (median) over
rotating inputs after warm-up. Also times the forward grouped GEMM alone: bf16
``torch._grouped_mm`` against FP8 rowwise ``torch._scaled_grouped_mm`` on rebased operands,
without and with the preparation (quantize + rebase through the ``mxfp8::`` ops).

    python benchmarks/bench_moe_layer.py --shapes deepseek_v3 llama4_scout --tokens 16384

Prints a table and writes the raw numbers as JSON (``--out``); the caller records them in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time

import torch
import torch._inductor.config
import triton
from triton.testing import do_bench

import mxfp8_compile
from mxfp8_compile import ops
from mxfp8_compile.examples.moe import MoE, MoEConfig
from mxfp8_compile.numerics import sqnr

SHAPES = {
    "llama4_scout": dict(dim=5120, expert_hidden=8192),
    "deepseek_v3": dict(dim=7168, expert_hidden=2048),
}
ROTATING = 3


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def moe_layer(shape: str, tokens: int, experts: int) -> dict:
    cfg = MoEConfig(**SHAPES[shape], experts=experts, top_k=1, shared_hidden=0, layers=1)
    torch.manual_seed(0)
    bf16 = MoE(cfg).to(device="cuda", dtype=torch.bfloat16)
    for p in bf16.parameters():
        torch.nn.init.normal_(p, std=0.02)
    mx = copy.deepcopy(bf16)
    # the layer's input needs its gradient, as inside a model (else two dgrad GEMMs vanish)
    xs = [torch.randn(1, tokens, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
          for _ in range(ROTATING)]
    grads = [torch.randn_like(x) for x in xs]

    def stepper(module: torch.nn.Module):
        state = {"i": 0}

        def step() -> None:
            i = state["i"] = (state["i"] + 1) % ROTATING
            module(xs[i]).backward(grads[i])

        return step

    torch._dynamo.reset()
    compiled_bf16 = torch.compile(bf16)
    compile_bf16 = _sync_time(lambda: compiled_bf16(xs[0]).backward(grads[0]))
    compiled_mx = torch.compile(mx, backend="mxfp8")
    compile_mx = _sync_time(lambda: compiled_mx(xs[0]).backward(grads[0]))
    report = mxfp8_compile.last_report()

    # numerics of one step, from zeroed grads
    for m in (bf16, mx):
        m.zero_grad()
    out_bf16, out_mx = compiled_bf16(xs[1]), compiled_mx(xs[1])
    out_bf16.backward(grads[1])
    out_mx.backward(grads[1])
    # Expert weights only: with top-1 routing the normalized routing weight is exactly 1, so
    # the router gate's true gradient is zero and both runs hold only rounding noise there.
    numerics = {
        "output_sqnr": sqnr(out_bf16, out_mx),
        "worst_expert_weight_grad_sqnr": min(
            sqnr(p.grad, q.grad) for p, q in zip(bf16.experts.parameters(), mx.experts.parameters())
        ),
    }
    t_bf16 = do_bench(stepper(compiled_bf16), warmup=200, rep=1000, return_mode="median")
    t_mx = do_bench(stepper(compiled_mx), warmup=200, rep=1000, return_mode="median")
    return {
        "shape": shape, "tokens": tokens, "experts": experts, **SHAPES[shape],
        "target": report.target, "converted": len(report.converted()),
        "fwd_bwd_ms_bf16": t_bf16, "fwd_bwd_ms_mxfp8": t_mx, "speedup": t_bf16 / t_mx,
        "compile_s_bf16": compile_bf16, "compile_s_mxfp8": compile_mx, **numerics,
    }


def grouped_gemm(shape: str, tokens: int, experts: int) -> dict:
    k, n = SHAPES[shape]["dim"], SHAPES[shape]["expert_hidden"]
    offs = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * (tokens // experts)
    xs = [torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATING)]
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    i = {"i": 0}

    def nxt() -> torch.Tensor:
        i["i"] = (i["i"] + 1) % ROTATING
        return xs[i["i"]]

    def prepared(x: torch.Tensor):  # what the sm90 path runs: one fused cast kernel per operand
        ra, rsa = ops.quantize_rebase(x)
        rbt, rsb = ops.quantize_rebase(w)
        return ra, rsa, rbt.mT, rsb

    operands = prepared(xs[0])
    flops = 2 * tokens * k * n
    t_bf16 = do_bench(lambda: torch._grouped_mm(nxt(), w.mT, offs=offs), return_mode="median")
    t_gemm = do_bench(lambda: ops.scaled_grouped_mm_rowwise(*operands, offs, torch.bfloat16, False), return_mode="median")
    t_fast = do_bench(lambda: ops.scaled_grouped_mm_rowwise(*operands, offs, torch.bfloat16, True), return_mode="median")
    t_prep = do_bench(lambda: ops.scaled_grouped_mm_rowwise(*prepared(nxt()), offs, torch.bfloat16, False),
                      return_mode="median")
    return {
        "shape": shape, "tokens": tokens, "experts": experts, "K": k, "N": n,
        "ms_bf16": t_bf16, "ms_fp8_rowwise": t_gemm, "ms_fp8_rowwise_fast_accum": t_fast,
        "ms_with_preparation": t_prep,
        "tflops_bf16": flops / t_bf16 / 1e9, "tflops_fp8_rowwise": flops / t_gemm / 1e9,
        "speedup_gemm_only": t_bf16 / t_gemm, "speedup_with_preparation": t_bf16 / t_prep,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = parser.parse_args()
    # compile times must not come from Inductor's on-disk caches
    torch._inductor.config.force_disable_caches = True
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }
    print(meta, flush=True)
    results = {"meta": meta, "gemm": [], "layer": []}
    for shape in args.shapes:
        for tokens in args.tokens:
            g = grouped_gemm(shape, tokens, args.experts)
            results["gemm"].append(g)
            print(f"GEMM  {shape:13s} M={tokens:6d} bf16 {g['ms_bf16']:.3f} ms ({g['tflops_bf16']:.0f} TFLOPS) | "
                  f"fp8 rowwise {g['ms_fp8_rowwise']:.3f} ms ({g['tflops_fp8_rowwise']:.0f}), fast accum "
                  f"{g['ms_fp8_rowwise_fast_accum']:.3f} | with preparation {g['ms_with_preparation']:.3f} ms: "
                  f"{g['speedup_gemm_only']:.2f}x GEMM only, {g['speedup_with_preparation']:.2f}x with prep", flush=True)
            r = moe_layer(shape, tokens, args.experts)
            results["layer"].append(r)
            print(f"LAYER {shape:13s} tokens={tokens:6d} target {r['target']}: bf16 {r['fwd_bwd_ms_bf16']:.2f} ms, "
                  f"mxfp8 {r['fwd_bwd_ms_mxfp8']:.2f} ms -> {r['speedup']:.2f}x | compile {r['compile_s_bf16']:.1f} s "
                  f"vs {r['compile_s_mxfp8']:.1f} s | SQNR out {r['output_sqnr']:.1f} dB, worst expert wgrad "
                  f"{r['worst_expert_weight_grad_sqnr']:.1f} dB", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
