"""Experts applied with ``torch.bmm`` (HF Llama4's form) convert as grouped GEMMs of equal groups;
a bmm of two activations (attention) stays bf16, and so do weights gathered per token, with the
way out named."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.lowering import targets
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes.report import Layout, SkipReason

BF16 = torch.bfloat16
E, T, DIM, HIDDEN = 4, 48, 64, 96  # 48 tokens an expert: the wgrad's groups are not multiples of 32


class BmmExperts(nn.Module):
    """Attention written with bmm, then experts as Llama4 applies them: bmm on (E, T, D) views
    of the tokens sorted by expert, against (E, D, 2H) and (E, H, D) weights (the down
    projection with a bias through baddbmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, DIM, 2 * HIDDEN) / DIM**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, HIDDEN, DIM) / HIDDEN**0.5)
        self.down_bias = nn.Parameter(torch.randn(E, 1, DIM) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(E, T, 3 * DIM).chunk(3, dim=-1)
        x = x + torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v).view(-1, DIM)
        gate, up = torch.bmm(x.view(E, T, DIM), self.gate_up_proj).chunk(2, dim=-1)
        out = torch.baddbmm(self.down_bias, F.silu(gate) * up, self.down_proj)
        return out.view(-1, DIM)


def _train(model: nn.Module, config: Config, inductor: bool = False) -> tuple[dict[str, float], mxfp8_compile.PassReport]:
    torch.manual_seed(0)
    x = torch.randn(E * T, DIM, dtype=BF16)
    reference = {}
    x_ref = x.clone().requires_grad_()
    model(x_ref).float().pow(2).mean().backward()
    reference = {"out": model(x_ref).detach(), "x": x_ref.grad, **{n: p.grad for n, p in model.named_parameters()}}
    model.zero_grad()
    x_mx = x.clone().requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=inductor))(x_mx)
    out.float().pow(2).mean().backward()
    actual = {"out": out.detach(), "x": x_mx.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return {k: sqnr(reference[k], actual[k]) for k in reference}, mxfp8_compile.last_report()


@pytest.mark.parametrize("capability", [None, (9, 0), (10, 0)], ids=["emulated", "sm90", "sm100"])
def test_bmm_experts_convert_and_attention_stays_bf16(capability, monkeypatch: pytest.MonkeyPatch) -> None:
    if capability is not None:  # plan for the GPU target on the CPU: its ops run as emulations
        monkeypatch.setattr(targets, "device_capability", lambda device: capability)
    model = BmmExperts().to(BF16)
    db, report = _train(model, Config(dense_linears=False, cost_model=False))  # small shapes: every GEMM
    assert report.target == {None: "emulated", (9, 0): "sm90", (10, 0): "sm100"}[capability]
    batched = [e for e in report.entries if e.site.layout is Layout.BATCHED]
    decisions = collections.Counter((e.site.role.value, e.converted or e.decision.reason.name) for e in batched)
    # experts: gate_up (bmm) and down (baddbmm), each forward, dgrad, wgrad; attention: scores and
    # output, each forward and two backward GEMMs
    assert decisions == {("forward", True): 2, ("dgrad", True): 2, ("wgrad", True): 2,
                         ("forward", "BATCHED_ACTIVATIONS"): 2, ("wgrad", "BATCHED_ACTIVATIONS"): 4}
    wgrads = [str(e.decision) for e in batched if e.site.role.value == "wgrad" and e.converted]
    assert wgrads == ["converted"] * 2  # 48 tokens an expert: padded per group by the cast, as grouped wgrads
    # DESIGN's MoE-layer bars: output >= 23, input grad >= 29 (21 here: two MX GEMMs in a row
    # on 48 tokens an expert), weight grads >= 21
    assert db["out"] >= 23 and db["x"] >= 21 and min(db[n] for n in ("gate_up_proj", "down_proj")) >= 21, db


@pytest.mark.usefixtures("no_compile_caches")
def test_bmm_experts_lower_through_inductor() -> None:
    # the rewrite's own ops (the groups' offsets among them) must be ones Inductor lowers: the
    # joint graph is past decomposition
    db, report = _train(BmmExperts().to(BF16), Config(dense_linears=False), inductor=True)
    assert sum(e.converted for e in report.entries if e.site.layout is Layout.BATCHED) == 6
    assert db["out"] >= 23 and db["x"] >= 21 and min(db[n] for n in ("gate_up_proj", "down_proj")) >= 21, db


class GatheredExperts(nn.Module):
    """HF's ``batched_mm`` experts: each token's expert weights gathered, then one bmm, with the
    weight as B (``is_transposed=True``, gpt-oss) or as A (the default, Mixtral)."""

    def __init__(self, weight_as_a: bool) -> None:
        super().__init__()
        self.weight_as_a = weight_as_a
        self.weight = nn.Parameter(torch.randn(E, DIM, HIDDEN) / DIM**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = torch.arange(x.shape[0]) % E
        if self.weight_as_a:
            return torch.bmm(self.weight[expert].transpose(1, 2), x.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(x.unsqueeze(1), self.weight[expert]).squeeze(1)


@pytest.mark.parametrize("weight_as_a", [False, True], ids=["weight_as_b", "weight_as_a"])
def test_weights_gathered_per_token_stay_bf16_with_the_way_out(weight_as_a: bool) -> None:
    _, report = _train(GatheredExperts(weight_as_a).to(BF16), Config())
    batched = [e for e in report.entries if e.site.layout is Layout.BATCHED]
    # the forward and the dgrad read the gathered weights; the weight's gradient is an outer
    # product per token (a contraction of 1), not a GEMM
    assert sorted(e.site.role.value for e in batched) == ["dgrad", "forward"]
    assert all(e.decision.reason is SkipReason.GATHERED_WEIGHTS for e in batched), report.to_text()
    assert "experts_implementation='grouped_mm'" in str(batched[0].decision)
