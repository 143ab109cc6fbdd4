"""The Inductor lowering of the cast ops on the CPU: registered, and falling back to the op's own
kernel there (the template path runs on the GPU: test_gpu.py shows the fused kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.lowering import lowerings

import mxfp8_compile.lowering.inductor_quantize  # noqa: F401  (registers the lowering)
from mxfp8_compile import ops


def test_quantize_rebase_has_the_plugins_lowering() -> None:
    assert lowerings[torch.ops.mxfp8.quantize_rebase.default].__module__ == "mxfp8_compile.lowering.inductor_quantize"


@pytest.mark.usefixtures("no_compile_caches")
@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_cpu_falls_back_to_the_op_with_the_same_bits(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 256, generator=g).bfloat16() for _ in range(2))
    q, s = torch.compile(lambda a, b: ops.quantize_rebase(F.silu(a) * b, mode))(a, b)
    h = torch.compile(lambda a, b: F.silu(a) * b)(a, b)  # Inductor's own rounding of the producer
    rq, rs = ops.quantize_rebase(h, mode)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
