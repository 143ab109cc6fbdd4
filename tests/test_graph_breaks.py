"""Graphs compiled inside a module (a graph break there) see absolute module paths, so include and
exclude rules behave as without the break; data-dependent expert loops convert their wgrads."""

from __future__ import annotations

import collections
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes.report import SkipReason

DIM, HIDDEN, EXPERTS = 64, 128, 4


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """Mixtral's block as HF wrote it before grouped GEMMs: a router ``gate``, experts as
    ``nn.Linear``s, a loop over experts selecting tokens with ``torch.where`` (a graph break
    under default Dynamo, a data-dependent size with capture_dynamic_output_shape_ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(2)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == i)
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        return out


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"moe": LoopMoE()}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["moe"](x)
        return x


def _step(config: Config, capture_dynamic: bool = False) -> tuple[torch.Tensor, list[mxfp8_compile.PassReport]]:
    torch.manual_seed(0)
    model = Model().to(torch.bfloat16)
    x = torch.randn(96, DIM, dtype=torch.bfloat16)
    mark = _report.recorded()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture_dynamic):
        out = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=False))(x)
        out.float().pow(2).mean().backward()
    with torch.no_grad():
        return sqnr(model(x), out), _report.reports_since(mark)


def _paths(reports: list[mxfp8_compile.PassReport]) -> dict[str, set[bool]]:
    paths: dict[str, set[bool]] = collections.defaultdict(set)
    for report in reports:
        for e in report.entries:
            paths[e.site.fqn].add(e.converted)
    return dict(paths)


def test_paths_in_a_frame_compiled_inside_a_module_are_absolute() -> None:
    # The loops break: each expert's forward is a frame of its own (Dynamo runs the loops, and
    # the router, eagerly), compiled for the first expert and its first shapes.
    _, reports = _step(Config())
    paths = _paths(reports)
    assert set(paths) >= {"layers.0.moe.experts.0.w1", "layers.0.moe.experts.0.w2", "layers.0.moe.experts.0.w3"}
    assert all(re.fullmatch(r"layers\.[01]\.moe\.experts\.[0-3]\.w[123]", p) for p in paths), paths
    assert all(converted == {True} for converted in paths.values())


@pytest.mark.parametrize("rule,converted", [({"include_fqns": ("experts",)}, {"w1", "w2", "w3"}),
                                            ({"exclude_fqns": ("experts",)}, set()),
                                            ({"exclude_fqns": ("w2",)}, {"w1", "w3"})])
def test_include_and_exclude_see_absolute_paths(rule: dict, converted: set[str]) -> None:
    # (Relative to the frame, the paths were w1, w2, w3: 'experts' matched none of them.)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mxfp8_compile")  # rules alike for every expert: no warning
        _, reports = _step(Config(**rule))
    entries = [e for r in reports for e in r.entries]
    assert entries and {e.site.fqn.rsplit(".", 1)[1] for e in entries if e.converted} == converted
    assert {e.decision.reason for e in entries if not e.converted} <= {SkipReason.FQN_EXCLUDED}


def test_a_rule_that_one_shared_frame_cannot_follow_warns() -> None:
    # The frame compiled for layers.0's first expert also runs layers.1's experts.
    with pytest.warns(UserWarning, match=r"one compiled frame serves layers\.0\.moe\.experts\.0 and the other modules "
                                         r"of its class.* \(e\.g\. layers\.1\.moe\.experts\.0\.w1\)"):
        _step(Config(include_fqns=("layers.1",)))


def test_data_dependent_expert_loops_convert_their_wgrads() -> None:
    # capture_dynamic_output_shape_ops: one graph, each expert's tokens an unbacked size.
    output_sqnr, reports = _step(Config(), capture_dynamic=True)
    (report,) = reports
    experts = collections.Counter((e.site.role.value, e.converted) for e in report.entries if ".experts." in e.site.fqn)
    # 2 layers x 4 experts x 3 linears; the input needs no grad, so the first layer's experts
    # have dgrads only for w2 (whose input they compute)
    assert experts == {("forward", True): 24, ("dgrad", True): 12 + 4, ("wgrad", True): 24}
    wgrads = [str(e.decision) for e in report.entries if e.site.role.value == "wgrad" and ".experts." in e.site.fqn]
    assert all("(unknown at compile time) zero-padded to a multiple of 32" in w for w in wgrads)
    assert {e.decision.reason for e in report.entries if not e.converted} == {SkipReason.KEEP_BF16}  # the routers
    assert output_sqnr >= 23  # the routers stay bf16 and read the input: the same routing


class Unregistered(nn.Module):
    """A module that calls one it does not register: that one's place in the model is unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["hidden"] = Expert().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return self.hidden(x)


def test_paths_whose_place_is_unknown_are_marked_and_rules_warn() -> None:
    model = Unregistered().to(torch.bfloat16)
    mark = _report.recorded()
    with pytest.warns(UserWarning, match=r"relative to a compiled frame whose place in the model is unknown \(\?\.hidden"):
        torch.compile(model, backend=mxfp8_compile.backend(Config(exclude_fqns=("w2",)), inductor=False))(
            torch.randn(32, DIM, dtype=torch.bfloat16))
    paths = {e.site.fqn for r in _report.reports_since(mark) for e in r.entries}
    assert paths == {"?.hidden.w1", "?.hidden.w2", "?.hidden.w3"}


def test_weights_no_graph_reads_are_named() -> None:
    # The loops break and Dynamo leaves them, and so the routers, to Python; the experts' frames
    # are compiled once and run for every expert.
    torch.manual_seed(0)
    model = Model().to(torch.bfloat16)
    x = torch.randn(96, DIM, dtype=torch.bfloat16)
    compiled = torch.compile(model, backend=mxfp8_compile.backend(inductor=False))
    torch._dynamo.reset()
    compiled(x)  # compiles; the check runs after the next call
    with pytest.warns(UserWarning, match=r"no compiled graph read the weights of 2 modules: layers\.0\.moe\.gate "
                                         r"\(weight\), layers\.1\.moe\.gate \(weight\)\. .*experts_implementation"):
        compiled(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mxfp8_compile")
        compiled(x)  # once
    summary = mxfp8_compile.dump(model, x).summary
    assert summary.splitlines()[-1].startswith(
        "weights outside the graphs: no compiled graph read the weights of 2 modules: layers.0.moe.gate (weight)")


def test_a_graph_that_reads_every_weight_says_nothing() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mxfp8_compile: no compiled graph")
        torch.manual_seed(0)
        model = Model().to(torch.bfloat16)
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            compiled = torch.compile(model, backend=mxfp8_compile.backend(inductor=False))
            for _ in range(2):
                compiled(torch.randn(96, DIM, dtype=torch.bfloat16))
