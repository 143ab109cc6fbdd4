"""The default keep-in-bf16 policy reads roles from the graph: routers and output heads stay bf16,
modules that only share their names (a SwiGLU ``gate``, BERT's ``attention.output``) convert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes.report import SkipReason

DIM, EXPERTS = 64, 32


class SwiGLU(nn.Module):
    """A dense gated MLP whose gate projection is called ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """BERT's naming: the projection after attention is ``attention.output.dense``."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(DIM, DIM)
        self.output = nn.ModuleDict({"dense": nn.Linear(DIM, DIM), "norm": nn.LayerNorm(DIM)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output["norm"](x + self.output["dense"](torch.tanh(self.query(x))))


class Model(nn.Module):
    def __init__(self, break_before_topk: bool = False) -> None:
        super().__init__()
        self.attention, self.mlp = Attention(), SwiGLU()
        self.scorer = nn.Linear(DIM, EXPERTS)  # a router by what it does, not by its name
        self.gate = nn.Linear(DIM, EXPERTS)  # a router named like one, its top-k maybe behind a break
        self.output = nn.Linear(DIM, 96)
        self.break_before_topk = break_before_topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.attention(x))
        weights, _ = self.scorer(h).softmax(-1).topk(2)
        scores = self.gate(h)
        if self.break_before_topk:
            torch._dynamo.graph_break()
        top, _ = scores.topk(1)
        return self.output(h * (weights.sum(-1, keepdim=True) + top))


def _compile(model: nn.Module, config: Config) -> tuple[torch.Tensor, list[mxfp8_compile.PassReport]]:
    """One training step of ``model`` compiled with ``config``: the output and the reports."""
    torch.manual_seed(0)
    x = torch.randn(64, DIM, dtype=torch.bfloat16, requires_grad=True)
    mark = _report.recorded()
    torch._dynamo.reset()
    out = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=False))(x)
    out.float().pow(2).mean().backward()
    return out, _report.reports_since(mark)


def _kept(reports: list[mxfp8_compile.PassReport]) -> dict[str, set[str]]:
    """{module FQN: "role: evidence" of each of its GEMMs the keep policy kept}."""
    kept: dict[str, set[str]] = {}
    for report in reports:
        for site, skip in report.skipped():
            assert skip.reason is SkipReason.KEEP_BF16, (site, skip)
            kept.setdefault(site.fqn, set()).add(f"{site.role.value}: {skip.detail.split(':')[0]}")
    return kept


def _all_roles(evidence: str) -> set[str]:
    return {f"{role}: {evidence}" for role in ("forward", "dgrad", "wgrad")}


@pytest.mark.parametrize("break_before_topk", [False, True])
def test_routers_and_the_head_are_kept_by_role_not_by_name(break_before_topk: bool) -> None:
    torch.manual_seed(0)
    _, reports = _compile(Model(break_before_topk).to(torch.bfloat16), Config())
    # The SwiGLU's `gate` and BERT's `attention.output.dense` convert; the router named `scorer`
    # stays bf16 for its top-k, `gate` for its top-k (or, behind a graph break, for its name and
    # an output that leaves the graph), `output` as the head.
    assert _kept(reports) == {"scorer": _all_roles("router"), "gate": _all_roles("router"),
                              "output": _all_roles("output head")}
    converted = {s.fqn for r in reports for s in r.converted()}
    assert converted == {"attention.query", "attention.output.dense", "mlp.gate", "mlp.up", "mlp.down"}
    details = {str(d) for r in reports for _, d in r.skipped()}
    evidence = ("router: named 'gate', and its output leaves the graph with no GEMM after it" if break_before_topk
                else "router: its output picks experts through aten.topk.default")
    assert any(evidence in d for d in details)


def test_roles_off_and_names_on() -> None:
    _, reports = _compile(Model().to(torch.bfloat16), Config(keep_bf16_roles=(), keep_bf16_modules=("up",)))
    assert _kept(reports) == {"mlp.up": _all_roles("mlp.up has component 'up' (Config.keep_bf16_modules)")}
    assert sum(len(r.converted()) for r in reports) == 3 * 7  # eight linears, mlp.up kept


def test_a_gemm_reading_another_gemms_output_directly() -> None:
    # On 2D inputs nothing sits between two linears: each rewrite must read what replaced the
    # GEMM before it, not the node it erased.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)).to(torch.bfloat16)
    torch.manual_seed(0)  # the input _compile draws
    reference = model(torch.randn(64, DIM, dtype=torch.bfloat16))
    out, reports = _compile(model, Config())
    assert sum(len(r.converted()) for r in reports) == 3 * 3
    error = (out.float() - reference.float()).pow(2).mean() / reference.float().pow(2).mean()
    assert -10 * torch.log10(error) > 23  # three MX GEMMs in a row: 24.7 dB; DESIGN's layer output bar
