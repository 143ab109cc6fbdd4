"""Inputs for the Triton cast kernels, and the bit-exact check against numerics: shared by the
GPU tests and the interpreter run in CI (``python kernel_cases.py cpu``)."""

from __future__ import annotations

import sys

import torch

from mx_cases import CASES
from mxfp8_compile import numerics


def inputs(device: str, large: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def wide(*shape: int) -> torch.Tensor:  # a random binade per row, fp32 subnormal to huge
        rows = torch.randn(*shape, generator=g)
        return rows * torch.exp2(torch.randint(-135, 110, (*shape[:-1], 1), generator=g).float())

    cases = [
        torch.cat([c.tensor().float() for c in CASES]),
        torch.cat([c.tensor() for c in CASES if c.dtype == torch.bfloat16]),
        torch.randn(5, 96, generator=g).bfloat16(),
        wide(7, 160),
        wide(3, 64, 40).transpose(-2, -1),  # a weight's transposed view, read in place
        torch.empty(0, 64),
    ]
    if large:
        cases += [
            torch.randn(4099, 7168, generator=g).bfloat16(),
            wide(8, 512, 1024).bfloat16().transpose(-2, -1),
            (torch.randn(1000, 5120, generator=g) * torch.where(torch.rand(5120, generator=g) < 0.01, 1000.0, 1.0)).bfloat16(),
        ]
    return [c.to(device) for c in cases]


def mismatches(device: str, large: bool = False) -> list[str]:
    from mxfp8_compile.lowering.triton_quantize import quantize_rebase_rows

    failures = []
    for x in inputs(device, large):
        for mode in ("rceil", "floor"):
            q, s = quantize_rebase_rows(x, mode)
            rq, rs = numerics.rebase_rowwise(*numerics.to_mx(x.cpu(), mode=mode), dim=-1)
            got, want = q.cpu().view(torch.uint8), rq.view(torch.uint8)
            if not (torch.equal(got, want) and torch.equal(s.cpu(), rs)):
                bad = (got != want).nonzero()[:3].tolist()
                xc = x.cpu().float()
                examples = [f"{xc[tuple(i)].item():.6g}: {got[tuple(i)].item():#x} vs {want[tuple(i)].item():#x}" for i in bad]
                failures.append(f"{tuple(x.shape)} {x.dtype} {mode}: {int((got != want).sum())} bytes differ, "
                                f"scales {'equal' if torch.equal(s.cpu(), rs) else 'differ'}; {examples}")
    return failures


if __name__ == "__main__":
    bad = mismatches(sys.argv[1])
    print("MISMATCH: " + "; ".join(bad) if bad else "all bit-exact")
