"""A MoE layer forward+backward compiled with ``backend="mxfp8"`` against ``torch.compile`` bf16.

Same run, same shapes, same inputs: router, top-1 routing, SiLU-gated experts through
``torch._grouped_mm``, no shared expert. Timed with ``triton.testing.do_bench`` (median) over
rotating inputs after warm-up; compile times with Inductor's caches off (the median of
``--compile-runs`` fresh compilations each, alternating); the peak memory of one
step (``torch.cuda.max_memory_allocated`` after a reset, less what was allocated before the step).
``--checkpoint`` wraps the layer in full activation checkpointing for both compilations. The
GEMMs alone are in bench_gemms.py, where the time goes in profile_moe_layer.py.

    python benchmarks/bench_moe_layer.py --shapes deepseek_v3 llama4_scout --tokens 16384 [--checkpoint]

``--peers torchao_fp8_rowwise`` times torchao's FP8-rowwise grouped GEMM (``Float8TrainingOpConfig``
on the experts' weights, then ``torch.compile``: the Hopper peer) beside them in the same run, when
torchao is importable; a peer that cannot run gets its error in its row.

Prints a table and writes the raw numbers as JSON (``--out``); the caller records them in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
import traceback

import torch
import torch._inductor.config
from triton.testing import do_bench

import mxfp8_compile
from bench_gemms import run_meta
from mxfp8_compile import Config, numerics
from mxfp8_compile.examples.checkpointing import checkpointed
from mxfp8_compile.examples.moe import MoE, MoEConfig
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes import report as _report

SHAPES = {
    "llama4_scout": dict(dim=5120, expert_hidden=8192),
    "deepseek_v3": dict(dim=7168, expert_hidden=2048),
}
ROTATING = 3
# --variants: the plugin's Configs to time against bf16 (the default accumulates fast in all three
# roles, and converts only what its cost model predicts faster; every_gemm converts every expert GEMM;
# square_weights casts weights in 32x32 tiles)
VARIANTS = {"default": Config(), "every_gemm": Config(cost_model=False), "square_weights": Config(weight_blocks="32x32"),
            "fast_accum_forward": Config(fast_accum=("forward",)), "exact_accum": Config(fast_accum=()),
            "no_gathered_casts": Config(gathered_casts=False)}


def compile_mxfp8(module: torch.nn.Module, variant: str) -> torch.nn.Module:
    """``module`` compiled with ``backend="mxfp8"`` and the Config of ``variant`` as its options."""
    return torch.compile(module, backend="mxfp8", options=dataclasses.asdict(VARIANTS[variant]))


class PaddedTokenGroups(torch.nn.Module):
    """``experts`` run on token groups padded to multiples of 32 rows (zero rows between groups),
    as torchtitan pads them for torchao's FP8 grouped GEMM (its groups must be multiples of 16
    rows; torchao 0.18's own padding, ``pad_token_groups_for_grouped_mm``, is not supported with
    the rowwise recipe). The padding copies are part of what is timed."""

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        padded, padded_offs = numerics.pad_token_groups(x, offs)
        return numerics.unpad_token_groups(self.experts(padded, padded_offs), offs, x.shape[0])


def torchao_fp8_rowwise(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with torchao's FP8-rowwise grouped GEMM on its experts' weights (torchao's MoE
    training recipe for Hopper) on padded token groups, compiled by ``torch.compile``."""
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig
    from torchao.quantization import quantize_

    quantize_(module.experts, Float8TrainingOpConfig(), filter_fn=lambda mod, fqn: True)
    module.experts = PaddedTokenGroups(module.experts)
    return torch.compile(module)


PEERS = {"torchao_fp8_rowwise": torchao_fp8_rowwise}


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _step_peak_mib(step) -> float:
    """Peak memory of one step (after a warm-up step) above what was allocated before it, in MiB:
    the weights, grads and inputs of both layers are there before and are not counted."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def moe_layer(shape: str, tokens: int, experts: int, checkpoint: bool, compile_runs: int = 1,
              variants: tuple[str, ...] = ("default",), peers: tuple[str, ...] = ()) -> list[dict]:
    """One row per Config of ``variants`` (names in VARIANTS) and per peer of ``peers`` (names in
    PEERS), each against the same bf16 layer timed in the same run; compile times are of bf16 and
    the first variant."""
    cfg = MoEConfig(**SHAPES[shape], experts=experts, top_k=1, shared_hidden=0, layers=1)
    torch.manual_seed(0)
    bf16 = MoE(cfg).to(device="cuda", dtype=torch.bfloat16)
    if checkpoint:  # the wrapper forwards attribute lookups (.experts) to the layer
        bf16 = checkpointed(bf16, "full")
    for p in bf16.parameters():
        torch.nn.init.normal_(p, std=0.02)
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

    # compile time: the first call (compile and one step), afresh each time, the two alternating
    mx = copy.deepcopy(bf16)
    compile_s: dict[str, list[float]] = {"bf16": [], "mxfp8": []}
    for _ in range(compile_runs):
        for name, compile_fn in (("bf16", lambda: torch.compile(bf16)), ("mxfp8", lambda: compile_mxfp8(mx, variants[0]))):
            torch._dynamo.reset()
            compiled = compile_fn()
            compile_s[name].append(sync_time(lambda: compiled(xs[0]).backward(grads[0])))
    compiled_bf16 = torch.compile(bf16)
    compiled_bf16(xs[0]).backward(grads[0])
    t_bf16 = do_bench(stepper(compiled_bf16), warmup=200, rep=1000, return_mode="median")
    peak_bf16 = _step_peak_mib(stepper(compiled_bf16))
    base = {"shape": shape, "tokens": tokens, "experts": experts, **SHAPES[shape], "checkpoint": checkpoint,
            "fwd_bwd_ms_bf16": t_bf16, "step_peak_mib_bf16": peak_bf16,
            "compile_s_bf16": statistics.median(compile_s["bf16"]),
            "compile_s_mxfp8": statistics.median(compile_s["mxfp8"]), "compile_runs_s": compile_s}

    def measure(name: str, module: torch.nn.Module, compiled: torch.nn.Module) -> dict:
        """``compiled`` (of ``module``, a copy of the bf16 layer) against bf16: time, memory, SQNR."""
        compiled(xs[0]).backward(grads[0])
        for m in (bf16, module):  # numerics of one step, from zeroed grads
            m.zero_grad()
        out_bf16, out = compiled_bf16(xs[1]), compiled(xs[1])
        out_bf16.backward(grads[1])
        out.backward(grads[1])
        # Expert weights only: with top-1 routing the normalized routing weight is exactly 1, so
        # the router gate's true gradient is zero and both runs hold only rounding noise there.
        worst_wgrad = min(sqnr(p.grad, q.grad) for p, q in zip(bf16.experts.parameters(), module.experts.parameters()))
        t = do_bench(stepper(compiled), warmup=200, rep=1000, return_mode="median")
        return {**base, "variant": name, "fwd_bwd_ms": t, "speedup": t_bf16 / t,
                "step_peak_mib": _step_peak_mib(stepper(compiled)), "output_sqnr": sqnr(out_bf16, out),
                "worst_expert_weight_grad_sqnr": worst_wgrad}

    rows = []
    for variant in variants:
        # afresh: Dynamo would serve a copy of the layer the graph compiled before, and leave no report
        torch._dynamo.reset()
        mx = copy.deepcopy(bf16)
        compiled_mx = compile_mxfp8(mx, variant)
        mark = _report.recorded()
        row = measure(variant, mx, compiled_mx)
        report = _report.reports_since(mark)[0]
        rows.append({**row, "target": report.target, "converted": len(report.converted())})
    for peer in peers:
        try:
            module = copy.deepcopy(bf16)
            rows.append({**measure(peer, module, PEERS[peer](module)), "target": "peer"})
        except Exception as e:  # noqa: BLE001  (a peer that cannot run here is a row, not the end of the run)
            traceback.print_exc()  # the whole story in the log; the row keeps its first line
            rows.append({**base, "variant": peer, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--checkpoint", action="store_true", help="full activation checkpointing around the layer")
    parser.add_argument("--compile-runs", type=int, default=1, help="compile each this many times (median)")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                        help="the mxfp8 Configs to time, each against the same bf16 layer")
    parser.add_argument("--peers", nargs="+", default=[], choices=list(PEERS),
                        help="other FP8 training recipes to time against the same bf16 layer")
    parser.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = parser.parse_args()
    # compile times must not come from Inductor's on-disk caches
    torch._inductor.config.force_disable_caches = True
    meta = run_meta()
    print(meta, flush=True)
    results = {"meta": meta, "layer": []}
    for shape in args.shapes:
        for tokens in args.tokens:
            for r in moe_layer(shape, tokens, args.experts, args.checkpoint, args.compile_runs, tuple(args.variants),
                               tuple(args.peers)):
                results["layer"].append(r)
                head = f"LAYER {shape:13s} tokens={tokens:6d} {r['variant']}"
                if "error" in r:
                    print(f"{head}: could not run: {r['error']}", flush=True)
                    continue
                # compile times are the first variant's
                compiled = (f" | compile {r['compile_s_bf16']:.1f} s vs {r['compile_s_mxfp8']:.1f} s"
                            if r["variant"] == args.variants[0] else "")
                print(f"{head} target {r['target']}, {r.get('converted', '-')} converted: "
                      f"bf16 {r['fwd_bwd_ms_bf16']:.2f} ms, this {r['fwd_bwd_ms']:.2f} ms -> {r['speedup']:.2f}x"
                      f"{compiled} | SQNR out {r['output_sqnr']:.1f} dB, worst expert wgrad "
                      f"{r['worst_expert_weight_grad_sqnr']:.1f} dB | step peak memory {r['step_peak_mib_bf16']:.0f} MiB "
                      f"vs {r['step_peak_mib']:.0f} MiB{' (checkpointed)' if r['checkpoint'] else ''}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
