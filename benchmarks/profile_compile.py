"""Where the compile time of the MoE layer goes, bf16 against ``backend="mxfp8"``: the first call
(compile and one forward+backward) of each under cProfile, with Inductor's caches off, after one
unprofiled compilation of each has warmed the process (imports, Triton's start-up).

    python benchmarks/profile_compile.py --shape llama4_scout [--out DIR]

Prints each compilation's wall time, the kernels Inductor generated, Dynamo's per-phase times and
the functions with the largest cumulative time; with ``--out`` it also writes the raw pstats files
(``compile_<name>.pstats``, readable with ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import io
import pstats
from pathlib import Path

import torch
import torch._inductor.config
from torch._inductor import metrics

from bench_moe_layer import SHAPES, VARIANTS, sync_time, compile_mxfp8
from mxfp8_compile.examples.moe import MoE, MoEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama4_scout", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--variant", default="default", choices=list(VARIANTS), help="the mxfp8 Config")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", default=None, help="write the pstats files here")
    args = parser.parse_args()
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    cfg = MoEConfig(**SHAPES[args.shape], experts=8, top_k=1, shared_hidden=0, layers=1)
    bf16 = MoE(cfg).to(device="cuda", dtype=torch.bfloat16)
    mx = copy.deepcopy(bf16)
    x = torch.randn(1, args.tokens, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    compilers = {"bf16": lambda: torch.compile(bf16), "mxfp8": lambda: compile_mxfp8(mx, args.variant)}
    for compile_fn in compilers.values():  # warm the process
        torch._dynamo.reset()
        compile_fn()(x).backward(grad)
    for name, compile_fn in compilers.items():
        torch._dynamo.reset()
        metrics.reset()
        compiled = compile_fn()
        profiler = cProfile.Profile()
        seconds = profiler.runcall(sync_time, lambda: compiled(x).backward(grad))
        print(f"== {name}: first call {seconds:.2f} s, {metrics.generated_kernel_count} kernels generated")
        print(torch._dynamo.utils.compile_times(repr="str"))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
        print(text.getvalue())
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(Path(args.out) / f"compile_{name}.pstats")


if __name__ == "__main__":
    main()
