"""The compiler core end to end on our own MoE (emulated target, AOTAutograd-only mode)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mxfp8_compile
from compare import compare, count_ops, mse_to
from mxfp8_compile import Config
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.passes.report import Layout, Role, SkipReason

aten, mxfp8 = torch.ops.aten, torch.ops.mxfp8


def _aot(config: Config | None = None, graphs: dict | None = None):
    sink = None if graphs is None else graphs.__setitem__
    return lambda m: torch.compile(m, backend=mxfp8_compile.backend(config, inductor=False, on_graph=sink))


def test_every_expert_gemm_is_converted_and_the_router_stays_bf16() -> None:
    model, (x,) = build(MoEConfig(layers=2))
    graphs: dict[str, torch.fx.GraphModule] = {}
    compiled = _aot(graphs=graphs)(model)
    F.mse_loss(compiled(x.requires_grad_()).float(), torch.ones(1)).backward()

    report = mxfp8_compile.last_report()
    assert report.graph == "training" and report.target == "emulated"
    experts = [e for e in report.entries if e.site.fqn.endswith("moe.experts")]
    # 2 layers x 3 expert GEMMs x (forward, dgrad, wgrad), all converted
    assert sorted((e.site.role, e.site.layout) for e in experts) == sorted(
        [(Role.FORWARD, Layout.GROUPED_2D3D)] * 6 + [(Role.DGRAD, Layout.GROUPED_2D3D)] * 6
        + [(Role.WGRAD, Layout.GROUPED_2D2D)] * 6
    )
    assert all(e.converted for e in experts)
    # the router gates and the lm_head: skipped by policy, every role, with the reason
    kept = {(s.fqn, s.role) for s, d in report.skipped() if d.reason is SkipReason.KEEP_BF16}
    assert kept == {(f, r) for f in ("layers.0.moe.gate", "layers.1.moe.gate", "lm_head") for r in Role}
    assert len(report.skipped()) == 9
    # attention and shared-expert linears: 2 layers x 7 linears x 3 roles
    assert sum(1 for s in report.converted() if s.layout is Layout.DENSE) == 42

    # The final graphs agree with the report: no high-precision grouped GEMM is left.
    gemms = (mxfp8.scaled_grouped_mm.default, mxfp8.scaled_mm.default, aten._grouped_mm.default, aten.mm.default)
    assert count_ops(graphs["forward"], *gemms) == dict(zip(map(str, gemms), [6, 14, 0, 3]))
    assert count_ops(graphs["backward"], *gemms) == dict(zip(map(str, gemms), [12, 28, 0, 6]))


def test_whole_model_sqnr_against_eager_bf16() -> None:
    # DESIGN section 5's MoE-layer bars, on a one-block model (attention + MoE + lm_head).
    # Measured: output 50 dB, input grad 49 dB, weights >= 22.3 dB.
    model, inputs = build(MoEConfig(layers=1))
    result = compare(model, _aot(), inputs, mse_to("random"))
    assert result.output >= 23
    assert result.input_grad >= 29
    assert result.worst_weight[1] >= 21, result.worst_weight


def test_moe_layer_alone_sqnr_as_torchao_measures_it() -> None:
    # torchao's method: the MoE layer alone, MSE against ones. Measured: output 23.7 dB, weights
    # >= 23 dB; input grad 24 dB (torchtitan's MoE layer gives the same 24 dB here), short of the
    # 29 dB torchao reports for its layer: three MX GEMMs in a SiLU-gated expert compose to it.
    model, (x,) = build(MoEConfig(layers=1))
    result = compare(model.layers[0].moe, _aot(), (x,), mse_to("ones"))
    assert result.output >= 23
    assert result.input_grad >= 23
    assert result.worst_weight[1] >= 21, result.worst_weight


def test_training_50_adamw_steps_tracks_bf16() -> None:
    model, (x,) = build(MoEConfig(layers=2))
    teacher = torch.randn(x.shape[-1], 256, generator=torch.Generator().manual_seed(7))

    def batches(count: int, seed: int):
        """A fixed stream of fresh batches whose targets a linear teacher defines."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(count):
            xb = torch.randn(2, 64, x.shape[-1], generator=g).to(torch.bfloat16)
            yield xb, (xb.float() @ teacher).argmax(-1)

    def loss_of(run: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(run(xb).float().flatten(0, 1), yb.flatten())

    def train(m: torch.nn.Module, run: torch.nn.Module) -> tuple[list[float], float]:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses = []
        for xb, yb in batches(50, seed=3):
            loss = loss_of(run, xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():  # the end loss, on held-out batches, through the run's own numerics
            held_out = sum(loss_of(run, xb, yb).item() for xb, yb in batches(8, seed=99)) / 8
        return losses, held_out

    eager = copy.deepcopy(model)
    bf16, end_bf16 = train(eager, eager)
    mx, end_mx = train(model, _aot()(model))
    assert bf16[-1] < 0.85 * bf16[0], "the task must be learnable for the comparison to mean anything"
    print(f"end loss: bf16 {end_bf16:.4f}, mxfp8 {end_mx:.4f}")
    assert abs(end_mx - end_bf16) <= 0.02 * end_bf16, (end_mx, end_bf16)


def test_inference_graph_gets_the_same_rewrite() -> None:
    model, (x,) = build(MoEConfig(layers=1))
    graphs: dict[str, torch.fx.GraphModule] = {}
    with torch.no_grad():
        out = _aot(graphs=graphs)(model)(x)
    report = mxfp8_compile.last_report()
    assert report.graph == "inference" and set(graphs) == {"inference"}
    assert [s.role for s in report.converted() if s.layout is Layout.GROUPED_2D3D] == [Role.FORWARD] * 3
    assert count_ops(graphs["inference"], aten._grouped_mm.default) == {str(aten._grouped_mm.default): 0}
    with torch.no_grad():
        assert mxfp8_compile.numerics.sqnr(model(x), out) >= 23


def test_another_token_count_recompiles_dynamic_and_stays_correct() -> None:
    model, (x,) = build(MoEConfig(layers=1), seq=64)
    compiled = _aot()(copy.deepcopy(model))
    compiled(x)
    x2 = torch.randn(3, 40, x.shape[-1], dtype=x.dtype)  # 120 tokens, not a multiple of 32
    out = compiled(x2)
    report = mxfp8_compile.last_report()
    # the second compilation has a symbolic token count, and still converts every expert GEMM
    tokens = report.converted()[0].shapes[0][0]
    assert not tokens.isdigit(), report.to_text()
    assert sum(1 for s in report.converted() if s.fqn.endswith("experts")) == 9
    assert mxfp8_compile.numerics.sqnr(model(x2), out) >= 23
