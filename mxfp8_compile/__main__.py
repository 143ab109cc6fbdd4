"""``python -m mxfp8_compile``: compile the built-in example MoE with ``backend="mxfp8"``, run one
training step, and print what was converted and the SQNR against the same model in bf16.
``python -m mxfp8_compile --selftest``: check the GPU at hand (``mxfp8_compile.selftest``).

The bf16 baseline is compiled by the same compiler without the plugin (Inductor fuses bf16
elementwise chains in fp32, which by itself flips near-tie routing decisions of a random-init
router against eager); with ``--no-inductor`` it is eager, whose bf16 arithmetic that mode keeps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

import mxfp8_compile
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.numerics import sqnr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mxfp8_compile", description=__doc__)
    parser.add_argument("--layers", type=int, default=1, help="MoE blocks in the example model (default 1)")
    parser.add_argument("--scale-mode", default="rceil", choices=["rceil", "floor"])
    parser.add_argument(
        "--no-inductor", action="store_true", help="run the passes under AOTAutograd only (fast, no codegen)"
    )
    parser.add_argument(
        "--selftest", nargs="?", const="auto", choices=["auto", "sm90", "sm100"], metavar="TARGET",
        help="check the GPU's target (or TARGET, on a CPU its emulation) against the emulated reference, "
             "case by case; exit 1 on a mismatch",
    )
    args = parser.parse_args(argv)
    if args.selftest:
        from mxfp8_compile.self_check import selftest

        return 0 if selftest(target=None if args.selftest == "auto" else args.selftest) else 1

    config = mxfp8_compile.Config(scale_mode=args.scale_mode)
    model, (x,) = build(MoEConfig(layers=args.layers))
    reference = copy.deepcopy(model)
    if args.no_inductor:
        compiled = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=False))
        baseline, baseline_name = reference, "eager bf16"
    else:
        compiled = torch.compile(model, backend="mxfp8", options={"scale_mode": args.scale_mode})
        baseline, baseline_name = torch.compile(reference), "torch.compile bf16"

    target = torch.randn(x.shape[:-1] + (model.lm_head.out_features,), generator=torch.Generator().manual_seed(0))
    print(f"compiling the example MoE ({args.layers} block(s), {sum(p.numel() for p in model.parameters()):,} "
          f"parameters) with backend mxfp8 {'(AOTAutograd only)' if args.no_inductor else '(Inductor)'} ...",
          flush=True)
    start = time.perf_counter()
    x_new, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(x_new)
    F.mse_loss(out.float(), target).backward()
    print(f"compiled and ran forward + backward in {time.perf_counter() - start:.1f} s\n")
    ref = baseline(x_ref)
    F.mse_loss(ref.float(), target).backward()

    report = mxfp8_compile.last_report()
    print(report.to_text(), "\n")
    for key, count in report.counts().items():
        print(f"  {count:3d}  {key}")
    worst = min(
        (sqnr(p_ref.grad, p.grad), name)
        for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters())
    )
    print(
        f"\nSQNR against {baseline_name}: output {sqnr(ref, out):.1f} dB, input grad "
        f"{sqnr(x_ref.grad, x_new.grad):.1f} dB, worst weight grad {worst[0]:.1f} dB ({worst[1]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
