"""Train a small MoE language model on real text, ``torch.compile`` bf16 against ``backend="mxfp8"``.

Data: the Python standard library's own source files (``sysconfig.get_paths()["stdlib"]``, on every
machine, no download), bytes as tokens (vocab 256), files in sorted order, the last 5% of the bytes
held out. Model: the plugin's example MoE (``examples/moe.py``: attention, router, top-2 of 8
SiLU-gated experts through ``torch._grouped_mm``, rotary position embedding) under a byte embedding;
the default preset has 8 layers and about 250M parameters, ``llama4_width`` 2 layers at Llama4-Scout's
widths (about 4.5B). The runs (``--runs``: ``bf16``; ``mxfp8``, the default Config, which converts
what the target's cost model predicts faster; ``mxfp8_every_gemm``, every GEMM converted, the
numerics' convergence check; ``mxfp8_experts`` with only the expert GEMMs converted, to split a
loss gap between attention and experts; ``mxfp8_exact_accum`` without Hopper's fast FP8
accumulation, which ``Config`` uses by default on sm90; ``mxfp8_square_weights``, the default with
weights cast in 32x32 tiles) start from the same weights and see the
same batches in the same order; AdamW (fused on CUDA) with warm-up and cosine decay.
``--mode reduce-overhead`` compiles every run with CUDA graphs.

Seeds differ by more than the 0.5% to resolve (about 1.5% in held-out loss at 2000 steps; without
the rotary embedding, before 2026-12-05, the loss sat on a plateau that ended at a step that varied
from run to run, and one seed's runs landed up to 4% apart). ``--seeds`` repeats every run for each
seed (its initial weights and batch order), seed by seed, and the summary compares the runs seed for
seed: the mean of the paired gaps and its standard error. Each run starts from a reset Dynamo, its
CUDA graph pools freed, so no run's peak memory holds an earlier run's.

    python benchmarks/train_moe.py --steps 2000 --out train_out      # on a GPU
    python benchmarks/train_moe.py --seeds 1 2 3 --out train_out     # three seeds a run
    python benchmarks/train_moe.py --preset tiny --steps 20 --out d  # a CPU dry run
    python benchmarks/train_moe.py --preset llama4_width --memory   # where each run's peak memory is reached

Writes ``<out>/log.csv`` (every step of every run, rewritten as each run ends), ``<out>/loss.png``
(``plot_training.loss_figure``: training and held-out loss of every run; needs matplotlib, ``pip install -e
".[plots]"``, else skipped with a note, and ``python benchmarks/plot_training.py <out>/log.csv`` draws it from the
log later) and ``<out>/summary.md`` (the table for benchmarks/RESULTS.md, appended there with ``--results``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch import nn

import mxfp8_compile
import plot_training
from mxfp8_compile import Config
from mxfp8_compile.examples.moe import MoEConfig, MoEModel

PRESETS = {
    # 8 layers, 8 experts, top-2: about 250M parameters, 8192 tokens a step
    "default": dict(model=MoEConfig(dim=768, heads=12, layers=8, experts=8, top_k=2, expert_hidden=1536,
                                    shared_hidden=0, vocab=256, rope_theta=10_000.0), batch=8, seq=1024, lr=1e-3),
    # Llama4-Scout's widths (dim 5120, 40 heads, 16 experts of width 8192, a shared expert of the
    # same width, top-1) in 2 layers: about 4.5B parameters, which with AdamW's two moments fit one
    # H100 (80 GiB); 16384 tokens a step in 2 sequences of 8192. A lower peak learning rate: at
    # 1e-3 the loss spiked to 30-35 in the first steps (H200, 2026-12-07)
    "llama4_width": dict(model=MoEConfig(dim=5120, heads=40, layers=2, experts=16, top_k=1, expert_hidden=8192,
                                         shared_hidden=8192, vocab=256, rope_theta=500_000.0), batch=2, seq=8192,
                         lr=3e-4),
    "tiny": dict(model=MoEConfig(dim=64, heads=2, layers=2, experts=8, top_k=2, expert_hidden=64,
                                 shared_hidden=0, vocab=256, rope_theta=10_000.0), batch=2, seq=64, lr=1e-3),
}
# run name -> the plugin's Config (None: the bf16 baseline, plain torch.compile)
# (``mxfp8`` converts what the target's cost model predicts faster; ``mxfp8_every_gemm`` every GEMM
# the other rules allow, the numerics' convergence check)
RUNS = {"bf16": None, "mxfp8": Config(), "mxfp8_every_gemm": Config(cost_model=False),
        "mxfp8_experts": Config(dense_linears=False, cost_model=False),
        "mxfp8_exact_accum": Config(fast_accum=(), cost_model=False),
        "mxfp8_square_weights": Config(weight_blocks="32x32")}
# the held-out windows' draw: the one earlier sessions' seed-0 runs used (seed + 1)
HELDOUT_SEED = 1


def load_text(max_bytes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) uint8 tensors of the stdlib's .py files, sorted by path, 95/5 split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    text = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)
    split = int(len(text) * 0.95)
    return text[:split], text[split:]


class ByteLM(nn.Module):
    """Byte embedding -> the example MoE model -> logits over 256 bytes."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.body = MoEModel(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(tokens))


def batches(text: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless (input, target) batches of random windows, the same sequence for every run."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(text) - seq - 1, (batch,), generator=g)
        window = torch.stack([text[s:s + seq + 1] for s in starts.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


def heldout_batches(text: tuple[torch.Tensor, torch.Tensor], preset: str,
                    n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` held-out batches of ``preset``: the same for every run and seed."""
    held = batches(text[1], PRESETS[preset]["batch"], PRESETS[preset]["seq"], seed=HELDOUT_SEED)
    return [next(held) for _ in range(n)]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_loss(model: nn.Module, held: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(x.to(device)).float().flatten(0, 1), y.to(device).flatten()).item()
                  for x, y in held]
    return statistics.fmean(losses)


def setup(name: str, seed: int, args: argparse.Namespace,
          device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(model, its compiled form for run ``name``, AdamW), the initial weights of ``seed``, after
    a reset of everything an earlier run compiled (its CUDA graph pools included)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(seed)
    model = ByteLM(PRESETS[args.preset]["model"]).to(device=device, dtype=torch.bfloat16)
    if RUNS[name] is None:
        compiled = torch.compile(model, mode=args.mode)
    else:  # backend="mxfp8" with this run's Config and Inductor's mode
        compiled = torch.compile(model, backend=mxfp8_compile.backend(RUNS[name], mode=args.mode))
    # on CUDA the fused AdamW, one kernel a step: the multi-tensor one took 66 ms of an Llama4-width
    # bf16 step of 210 ms on an H200 (benchmarks/RESULTS.md, session 19), the same in every run,
    # which hides the GEMMs' difference behind the optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    return model, compiled, optimizer


def forward_loss(compiled: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(compiled(x).float().flatten(0, 1), y.flatten())


def update(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_step(model: nn.Module, compiled: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    loss = forward_loss(compiled, x, y)
    loss.backward()
    update(model, opt)
    return loss


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def warmed_up(name: str, args: argparse.Namespace, text: tuple[torch.Tensor, torch.Tensor], device: torch.device,
              steps: int, run: Callable[[Callable[[], Any]], Any] = lambda fn: fn(),
              ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Batches]:
    """Run ``name`` of the first seed, set up and trained ``steps`` steps (its compilation, AdamW's
    moments), each step called through ``run``: ``(model, compiled, optimizer, the batches to
    come)``, for the diagnostics."""
    preset = PRESETS[args.preset]
    seed = args.seeds[0]
    model, compiled, opt = setup(name, seed, args, device)
    data = batches(text[0], preset["batch"], preset["seq"], seed=seed)
    for _ in range(steps):
        x, y = (t.to(device) for t in next(data))
        run(lambda: train_step(model, compiled, opt, x, y).item())
    return model, compiled, opt, data


def profile(name: str, args: argparse.Namespace, text: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> None:
    """Print where a training step's time goes (the first seed): wall time, GPU kernel time, the top kernels."""
    model, compiled, opt, data = warmed_up(name, args, text, device, steps=5)
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, compiled, opt, *(t.to(device) for t in next(data))).item()
        wall = (time.perf_counter() - start) / steps * 1000
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:80]] = kernels.get(e.name[:80], 0.0) + e.device_time / steps / 1000
    print(f"\n{name}: {wall:.1f} ms a step (wall, under the profiler), {sum(kernels.values()):.1f} ms of GPU kernels")
    for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.profile]:
        print(f"  {ms:7.2f} ms  {kernel}")
    ops = prof.key_averages()
    print("  CPU ops by self time:")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {e.self_cpu_time_total / steps / 1000:7.2f} ms  {e.count // steps:5d} calls  {e.key[:70]}")


def memory_by_phase(name: str, args: argparse.Namespace, text: tuple[torch.Tensor, torch.Tensor],
                    device: torch.device) -> None:
    """Print where run ``name``'s peak memory is reached (CUDA only): in each of its first steps
    (compilation, CUDA graphs' recording, AdamW's first step allocating its moments), in its
    first held-out evaluation (the no-grad graph compiles), then in each phase of one later step.
    Under ``--mode reduce-overhead`` that step is a graph's replay, which allocates nothing (its
    memory was taken when the graph was recorded), so its phases are left out."""
    def peak_of(fn: Callable[[], Any]) -> tuple[Any, float]:
        """``fn()`` and the peak allocation in GiB while it ran."""
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) / 2**30

    warm_up: list[float] = []
    model, compiled, opt, data = warmed_up(name, args, text, device, steps=3,
                                           run=lambda fn: warm_up.append(peak_of(fn)[1]))
    _, evaluation = peak_of(lambda: heldout_loss(compiled, heldout_batches(text, args.preset, 1), device))
    x, y = (t.to(device) for t in next(data))
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device) / 2**30
    line = (f"{name}: peak (GiB) in warm-up steps {', '.join(f'{p:.2f}' for p in warm_up)}; in the first held-out "
            f"evaluation {evaluation:.2f}; allocated at a later step's start {start:.2f}")
    if args.mode == "reduce-overhead":
        print(f"{line}; its phases are CUDA graph replays, which allocate nothing")
        return
    loss, forward = peak_of(lambda: forward_loss(compiled, x, y))
    _, backward = peak_of(loss.backward)
    _, adamw = peak_of(lambda: update(model, opt))
    print(f"{line}; its peak by phase: forward and loss {forward:.2f}, backward {backward:.2f}, "
          f"clip and AdamW {adamw:.2f}")


def train(name: str, seed: int, args: argparse.Namespace, text: tuple[torch.Tensor, torch.Tensor],
          device: torch.device) -> list[dict]:
    """The log rows of run ``name`` from ``seed``'s weights and batches; the held-out batches
    are the same for every seed."""
    preset = PRESETS[args.preset]
    batch, seq = preset["batch"], preset["seq"]
    model, compiled, opt = setup(name, seed, args, device)
    params = sum(p.numel() for p in model.parameters())
    held = heldout_batches(text, args.preset, args.heldout_batches)
    data = batches(text[0], batch, seq, seed=seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, start = [], time.perf_counter()
    for step in range(args.steps):
        x, y = (t.to(device, non_blocking=True) for t in next(data))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        t0 = time.perf_counter()
        loss_value = train_step(model, compiled, opt, x, y).item()  # synchronizes: the step is complete
        seconds = time.perf_counter() - t0
        row = {"run": name, "seed": seed, "step": step, "train_loss": loss_value, "tokens_per_s": batch * seq / seconds,
               "heldout_loss": ""}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row["heldout_loss"] = heldout_loss(compiled, held, device)
        rows.append(row)
        if not math.isfinite(loss_value):
            raise RuntimeError(f"{name}: the loss is {loss_value} at step {step}; stopping")
        done = (step + 1) / args.steps
        print(f"\r{name:6s} seed {seed} [{'#' * int(30 * done):30s}] {step + 1}/{args.steps} loss {loss_value:.3f} "
              f"{row['tokens_per_s']:,.0f} tok/s {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    for row in rows:
        row["params"], row["peak_bytes"] = params, peak
    return rows


def _run_stats(mine: list[dict], args: argparse.Namespace) -> dict[str, float]:
    tail = mine[len(mine) // 10:]  # skip compilation and warm-up steps
    return {
        "train": statistics.fmean(r["train_loss"] for r in mine[-args.eval_every:]),
        "heldout": [r["heldout_loss"] for r in mine if r["heldout_loss"] != ""][-1],
        "tps": statistics.median(r["tokens_per_s"] for r in tail),
        "peak": mine[-1]["peak_bytes"],
    }


def _against_bf16(run: str, out: dict[tuple[str, int], dict[str, float]], seeds: list[int]) -> str:
    """One line: ``run`` against bf16, seed for seed (paired: the same weights and batches)."""
    def ratios(key: str) -> list[float]:
        return [out[run, s][key] / out["bf16", s][key] for s in seeds]

    gaps = [r - 1 for r in ratios("heldout")]
    speed, memory = statistics.fmean(ratios("tps")), statistics.fmean(ratios("peak"))
    tail = f"tokens/s ratio {speed:.2f}x; peak memory ratio {memory:.2f}x."
    if len(seeds) == 1:
        return f"{run} against bf16: held-out gap {gaps[0]:+.2%}; {tail}"
    error = statistics.stdev(gaps) / math.sqrt(len(gaps))
    each = ", ".join(f"{g:+.2%}" for g in gaps)
    return (f"{run} against bf16: held-out gap {statistics.fmean(gaps):+.2%} ± {error:.2%} (the mean of the gaps "
            f"seed for seed and its standard error; seeds {', '.join(map(str, seeds))}: {each}); {tail}")


def summarize(rows: list[dict], args: argparse.Namespace, device: torch.device) -> str:
    out = {(name, seed): _run_stats([r for r in rows if r["run"] == name and r["seed"] == seed], args)
           for seed in args.seeds for name in args.runs}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"### {datetime.date.today().isoformat()}: train_moe.py, preset {args.preset}, {args.steps} steps, "
        f"{rows[0]['params'] / 1e6:.1f}M parameters",
        "",
        f"Device: {name}, torch {torch.__version__}, triton {triton.__version__}. For each seed the same weights "
        f"and batches in every run; Inductor mode {args.mode or 'default'} for every run.",
        "",
        "| run | seed | train loss (last evals) | held-out loss | median tokens/s | peak memory GiB |",
        "|---|---|---|---|---|---|",
    ]
    for (run, seed), v in out.items():
        lines.append(f"| {run} | {seed} | {v['train']:.4f} | {v['heldout']:.4f} | {v['tps']:,.0f} | "
                     f"{v['peak'] / 2**30:.2f} |")
    lines.append("")
    if "bf16" in args.runs:
        lines += [_against_bf16(run, out, args.seeds) for run in args.runs if run != "bf16"]
    return "\n".join(lines + [""])


def write_loss_plot(rows: list[dict], path: Path, title: str) -> None:
    """Draw ``rows`` (log rows) to the PNG ``path``; without matplotlib print one line saying the
    plot was skipped and how to get it (the log, written before, is kept)."""
    if not plot_training.have_matplotlib():
        print(f"{path} skipped: matplotlib is not installed ({plot_training.PLOTS_HINT}, then "
              f"python benchmarks/plot_training.py {path.with_name('log.csv')})", file=sys.stderr)
        return
    plot_training.save_png(plot_training.loss_figure(rows, title=title), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--heldout-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="repeat every run for each seed (initial weights and batch order)")
    parser.add_argument("--max-bytes", type=int, default=None, help="read only this much of the stdlib")
    parser.add_argument("--out", default="train_moe_out")
    parser.add_argument("--results", default=None, help="append the summary to this Markdown file")
    parser.add_argument("--runs", nargs="+", default=["bf16", "mxfp8"], choices=list(RUNS),
                        help="mxfp8: the default Config; mxfp8_every_gemm: the cost model off; mxfp8_experts: "
                             "only the expert GEMMs in MXFP8 (Config(dense_linears=False))")
    parser.add_argument("--mode", default=None, choices=[None, "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="Inductor's mode for both runs (reduce-overhead: CUDA graphs)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of training, profile a few steps of each run and print the top N kernels")
    parser.add_argument("--memory", action="store_true",
                        help="instead of training, print each run's peak memory in its first steps, its first held-out "
                             "evaluation and the phases of a later step (CUDA only)")
    args = parser.parse_args()
    if args.lr is None:
        args.lr = PRESETS[args.preset]["lr"]
    args.warmup = min(args.warmup, max(1, args.steps // 10))
    args.eval_every = min(args.eval_every, args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory and device.type != "cuda":
        parser.error("--memory reads CUDA's allocator statistics: run it on a GPU")
    text = load_text(args.max_bytes)
    print(f"stdlib text: {len(text[0]):,} train bytes, {len(text[1]):,} held out; device {device}", file=sys.stderr)
    if args.profile or args.memory:
        for name in args.runs:
            (profile if args.profile else memory_by_phase)(name, args, text, device)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.runs:
            rows += train(name, seed, args, text, device)
            with open(out / "log.csv", "w", newline="") as f:  # after every run: a cut-off job keeps its runs
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    write_loss_plot(rows, out / "loss.png", title=f"train_moe.py --preset {args.preset}, {datetime.date.today()}: "
                    f"{rows[0]['params'] / 1e6:.1f}M parameters, {args.steps} steps")
    summary = summarize(rows, args, device)
    (out / "summary.md").write_text(summary)
    print(summary)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + summary)


if __name__ == "__main__":
    main()
