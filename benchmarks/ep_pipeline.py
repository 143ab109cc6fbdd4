"""An expert-parallel MoE layer, ``backend="mxfp8"`` against the same layer compiled in bf16.

The layer is ``examples/ep_moe.py`` (router, top-k, dispatch all-to-all with ``.tolist()`` splits,
padded permutation, SiLU-gated grouped GEMMs, unpermute, combine all-to-all), one per rank, each
rank holding ``experts / world`` experts. Forward, backward and both are timed separately (CUDA
events, median over rotating inputs after warm-up; wall clock on CPU), all-to-all kernel time comes
from the profiler (GPU), bytes on the wire from the plugin's report, SQNR against bf16 per rank.

    torchrun --nproc-per-node 2 benchmarks/ep_pipeline.py --shapes deepseek_v3 --tokens 16384
    torchrun --nproc-per-node 2 benchmarks/ep_pipeline.py --dry-run      # CPU, gloo, tiny shapes

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are set unless already set). Rank 0 prints a table and appends it to
``--results`` when given.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import triton

import mxfp8_compile
from mxfp8_compile.config import A2A_PAYLOADS, A2A_WGRAD_POLICIES, A2A_WIRE_FORMATS
from mxfp8_compile.examples.ep_moe import EPMoE, EPMoEConfig
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes.report import PassReport, clear_reports

# NVLink multicast must stay off on the lent machines
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SHAPES = {"deepseek_v3": dict(dim=7168, hidden=2048), "llama4_scout": dict(dim=5120, hidden=8192),
          "tiny": dict(dim=128, hidden=128)}
ROTATING = 3
BF16 = torch.bfloat16


def make_tokens(cfg: EPMoEConfig, gate: torch.nn.Linear, tokens: int, routing: str, seed: int,
                device: torch.device) -> torch.Tensor:
    """(T, dim) bf16 tokens; ``skewed`` adds a component along the gate's first row, so that
    expert 0 takes a large share (the share is measured and printed, not assumed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.dim, generator=g)
    if routing == "skewed":
        row = gate.weight[0].detach().float().cpu()
        x += 0.5 * row / row.norm() * cfg.dim**0.5 * torch.rand(tokens, 1, generator=g)
    return x.to(device=device, dtype=BF16)


def expert0_share(model: EPMoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        top = model.gate(x).float().topk(model.cfg.top_k, dim=-1).indices
    return (top == 0).float().sum().item() / top.numel()


class Timer:
    """Elapsed milliseconds of a callable: CUDA events on the GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def time_layer(layer: torch.nn.Module, xs: list[torch.Tensor], grads: list[torch.Tensor], steps: int,
               warmup: int, timer: Timer) -> dict[str, float]:
    """Median forward, backward and forward+backward ms over ``steps`` steps after ``warmup``."""
    fwd, bwd = [], []
    for step in range(warmup + steps):
        i = step % len(xs)
        x = xs[i].detach().requires_grad_()
        dist.barrier()
        holder: dict[str, torch.Tensor] = {}
        t_f = timer(lambda: holder.__setitem__("out", layer(x)))
        t_b = timer(lambda: holder["out"].backward(grads[i]))
        if step >= warmup:
            fwd.append(t_f)
            bwd.append(t_b)
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
            "step_ms": statistics.median(f + b for f, b in zip(fwd, bwd))}


def a2a_kernel_ms(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> float | None:
    """All-to-all kernel time of one forward+backward (NCCL kernels in the profiler); None off GPU."""
    if device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(x.detach().requires_grad_()).backward(grad)
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in e.name.lower()) / 1e3


def numerics(bf16: torch.nn.Module, mx: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """SQNR (dB) of the MXFP8 layer against bf16 on one step from zeroed grads: output, input
    grad, worst expert weight grad."""
    results = {}
    for name, layer in (("bf16", bf16), ("mx", mx)):
        layer.zero_grad()
        xi = x.detach().requires_grad_()
        out = layer(xi)
        out.backward(grad)
        results[name] = (out.detach(), xi.grad)
    # Expert weights only: with top-1 the normalized routing weight is exactly 1, so the gate's
    # true gradient is zero and both runs hold only rounding noise there.
    worst = min(sqnr(p.grad, q.grad) for (name, p), q in zip(bf16.named_parameters(), mx.parameters())
                if not name.endswith("gate.weight"))  # compiled modules prefix "_orig_mod."
    return {"sqnr_out": sqnr(results["bf16"][0], results["mx"][0]),
            "sqnr_input_grad": sqnr(results["bf16"][1], results["mx"][1]), "sqnr_worst_weight_grad": worst}


def wire_bytes(report: PassReport | None, rows: int, dim: int) -> tuple[int, int]:
    """Token bytes one rank sends in one step, bf16 and with the plugin: the four token
    all-to-alls (dispatch and combine, forward and backward) of ``rows`` rows each; those in the
    report (feeding quantized GEMMs, or carried as MXFP8) as it counts them, the rest bf16 rows."""
    fed = report.hoists if report else []
    before, after = report.wire_row_bytes() if report else (0, 0)
    others = (4 - len(fed)) * dim * 2
    return (before + others) * rows, (after + others) * rows


def run_case(shape: str, tokens: int, routing: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = EPMoEConfig(**SHAPES[shape], experts=args.experts, top_k=args.top_k, align=32, expert="swiglu")
    model = EPMoE(cfg, seed=0).to(device=device, dtype=BF16)
    rank = dist.get_rank()
    xs = [make_tokens(cfg, model.gate, tokens, routing, seed=1000 * rank + i, device=device) for i in range(ROTATING)]
    grads = [torch.randn_like(x) for x in xs]
    bf16 = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled_bf16 = torch.compile(bf16, fullgraph=True)
    compiled_mx = torch.compile(model, backend="mxfp8", options=args.options, fullgraph=True)
    clear_reports()
    nums = numerics(compiled_bf16, compiled_mx, xs[0], grads[0])
    training = [r for r in mxfp8_compile.reports() if r.graph == "training"]
    timer = Timer(device)
    t_bf16 = time_layer(compiled_bf16, xs, grads, args.steps, args.warmup, timer)
    t_mx = time_layer(compiled_mx, xs, grads, args.steps, args.warmup, timer)
    before, after = wire_bytes(training[-1] if training else None, tokens * cfg.top_k, cfg.dim)
    row = {"shape": shape, "tokens_per_rank": tokens, "routing": routing, "world": dist.get_world_size(),
           "expert0_share": expert0_share(model, xs[0]),
           "target": training[-1].target if training else "none",
           "converted": len(training[-1].converted()) if training else 0,
           **{f"bf16_{k}": v for k, v in t_bf16.items()}, **{f"mxfp8_{k}": v for k, v in t_mx.items()},
           "speedup": t_bf16["step_ms"] / t_mx["step_ms"],
           "a2a_ms_bf16": a2a_kernel_ms(compiled_bf16, xs[0], grads[0], device),
           "a2a_ms_mxfp8": a2a_kernel_ms(compiled_mx, xs[0], grads[0], device),
           "a2a_bytes_bf16": before, "a2a_bytes_mxfp8": after, "a2a_bytes_ratio": after / before, **nums}
    # the slowest rank sets the step: report each timing as its maximum over ranks, SQNR as the minimum
    for key in list(row):
        if isinstance(row[key], float) and key != "expert0_share":
            value = torch.tensor(row[key], dtype=torch.float64, device=device)  # NCCL: on the GPU
            dist.all_reduce(value, op=dist.ReduceOp.MIN if key.startswith("sqnr") else dist.ReduceOp.MAX)
            row[key] = value.item()
    row["speedup"] = row["bf16_step_ms"] / row["mxfp8_step_ms"]
    return row


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"### {meta['date']}: ep_pipeline.py, {meta['world']} ranks ({meta['backend']})", "",
             f"Device: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}.", "",
             "| shape | tokens/rank | routing (expert 0 share) | bf16 fwd / bwd / step ms | mxfp8 fwd / bwd / step ms "
             "| speedup | a2a kernel ms bf16 / mxfp8 | a2a bytes ratio | SQNR out / in-grad / worst W |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a2a = "-" if r["a2a_ms_bf16"] is None else f"{r['a2a_ms_bf16']:.2f} / {r['a2a_ms_mxfp8']:.2f}"
        lines.append(
            f"| {r['shape']} | {r['tokens_per_rank']} | {r['routing']} ({r['expert0_share']:.0%}) | "
            f"{r['bf16_fwd_ms']:.2f} / {r['bf16_bwd_ms']:.2f} / {r['bf16_step_ms']:.2f} | "
            f"{r['mxfp8_fwd_ms']:.2f} / {r['mxfp8_bwd_ms']:.2f} / {r['mxfp8_step_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{a2a} | {r['a2a_bytes_ratio']:.2f}x | {r['sqnr_out']:.1f} / {r['sqnr_input_grad']:.1f} / "
            f"{r['sqnr_worst_weight_grad']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["deepseek_v3", "llama4_scout"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--routing", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--a2a-wgrad", default="dequant", choices=A2A_WGRAD_POLICIES)
    parser.add_argument("--a2a-payloads", default="gemm_inputs", choices=A2A_PAYLOADS,
                        help="'all': the combine forward and dispatch backward carry 8 bits too (Config.a2a_payloads)")
    parser.add_argument("--a2a-wire-format", default="mxint8", choices=A2A_WIRE_FORMATS,
                        help="the format of those two with --a2a-payloads all (Config.a2a_wire_format)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, few steps (a CPU check of the script)")
    parser.add_argument("--results", default=None, help="rank 0 appends the table to this Markdown file")
    args = parser.parse_args()
    if args.dry_run:
        args.shapes, args.tokens, args.steps, args.warmup = ["tiny"], [256], 3, 1
    args.options = {"a2a_wgrad": args.a2a_wgrad, "a2a_payloads": args.a2a_payloads,
                    "a2a_wire_format": args.a2a_wire_format}
    torch._dynamo.config.capture_scalar_outputs = True  # the .tolist() splits
    for name, value in NO_MULTICAST.items():
        os.environ.setdefault(name, value)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    meta = {"date": datetime.date.today().isoformat(), "world": dist.get_world_size(), "backend": backend,
            "device": torch.cuda.get_device_name(device) if cuda else "CPU", "torch": torch.__version__,
            "triton": triton.__version__}
    rows = []
    try:
        for shape in args.shapes:
            for tokens in args.tokens:
                for routing in args.routing:
                    rows.append(run_case(shape, tokens, routing, args, device))
                    if dist.get_rank() == 0:
                        print(table(rows[-1:], meta), flush=True)
        if dist.get_rank() == 0:
            print(table(rows, meta))
            if args.results:
                with open(args.results, "a") as f:
                    f.write("\n" + table(rows, meta))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
