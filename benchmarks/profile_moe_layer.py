"""Where the time of one MXFP8 MoE-layer step goes: CUDA kernel times from the profiler,
grouped by kernel name (the measured breakdown asked for wherever a speed target is missed).

    python benchmarks/profile_moe_layer.py --shape deepseek_v3 --tokens 16384 [--variant fast_accum_forward]
"""

from __future__ import annotations

import argparse
import collections
import copy

import torch

from bench_moe_layer import SHAPES, VARIANTS, compile_mxfp8
from mxfp8_compile.examples.moe import MoE, MoEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="deepseek_v3", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--variant", default="default", choices=list(VARIANTS), help="the mxfp8 Config")
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = MoE(MoEConfig(**SHAPES[args.shape], experts=8, top_k=1, shared_hidden=0)).cuda().bfloat16()
    x = torch.randn(1, args.tokens, SHAPES[args.shape]["dim"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    mxfp8 = compile_mxfp8(layer, args.variant)
    for name, compiled in (("bf16", torch.compile(copy.deepcopy(layer))), ("mxfp8", mxfp8)):
        for _ in range(3):
            compiled(x).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                compiled(x).backward(grad)
            torch.cuda.synchronize()
        totals: collections.Counter[str] = collections.Counter()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name[:90]] += event.device_time / 5 / 1000  # ms per step
        print(f"\n{name}: {sum(totals.values()):.2f} ms of kernels per step ({args.shape}, {args.tokens} tokens)")
        for kernel, ms in totals.most_common(args.top):
            print(f"  {ms:8.3f} ms  {kernel}")


if __name__ == "__main__":
    main()
