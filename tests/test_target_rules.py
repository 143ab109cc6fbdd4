"""Shapes the targets' GEMM kernels refuse: torch checks them in C++ at run time (its meta function
for ``_scaled_grouped_mm`` does not), so the finder keeps such GEMMs in bf16 and names the rule.
The same models run on an H100 in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.lowering import targets
from mxfp8_compile.passes.report import PassReport, SkipReason


def _report(width: int, config: Config) -> PassReport:
    model, (x,) = build(MoEConfig(layers=1, expert_hidden=width, shared_hidden=width))
    out = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=False))(x)
    F.mse_loss(out.float(), torch.ones(out.shape)).backward()
    return mxfp8_compile.last_report()


@pytest.mark.parametrize("width", [200, 264])  # multiples of 8, not of 16
@pytest.mark.parametrize("capability,target", [((9, 0), "sm90"), ((10, 0), "sm100")])
def test_odd_expert_widths_keep_what_the_kernels_refuse(
    width: int, capability: tuple[int, int], target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(targets, "device_capability", lambda device: capability)
    report = _report(width, Config(cost_model=False))  # the rules, not the cost model (small shapes)
    assert report.target == target
    columns = {e.site.label: int(e.site.shapes[1][-1]) for e in report.entries}
    for e in report.entries:
        if e.converted:
            assert columns[e.site.label] % 16 == 0, e.site
        elif e.decision.reason is SkipReason.TARGET_RULE:
            assert columns[e.site.label] == width
            assert str(e.decision).endswith(f"output columns N={width} not a multiple of 16: torch's {target} FP8 "
                                            "GEMMs need N % 16 == 0 (\"Expected mat_b shape to be divisible by 16\")")
    reasons = [e.decision.reason for e in report.entries if not e.converted]
    # N = width in the experts and in the shared expert: the gate's and the up projection's
    # forwards, the down projection's dgrad and wgrad
    assert reasons.count(SkipReason.TARGET_RULE) == 2 * 4
    # the contraction is the width: zero-padded to 224 or 288, and converted
    padded = [e for e in report.entries if "zero-padded" in str(e.decision)]
    assert len(padded) == 2 * 3 and all(e.converted and e.site.contraction == str(width) for e in padded)
    experts = [e for e in report.entries if e.site.fqn.endswith("moe.experts")]
    assert sorted((e.site.role.value, e.site.layout.value) for e in experts if e.converted) == [
        ("dgrad", "2Dx3D"), ("dgrad", "2Dx3D"), ("forward", "2Dx3D"), ("wgrad", "2Dx2D"), ("wgrad", "2Dx2D")]


def test_the_emulated_target_has_no_such_rule() -> None:
    report = _report(200, Config(target="emulated"))
    assert SkipReason.TARGET_RULE not in {e.decision.reason for e in report.entries if not e.converted}
    assert sum(e.converted and e.site.role.value == "forward" and e.site.shapes[1][-1] == "200"
               for e in report.entries) == 4  # the gate and up projections of experts and shared expert


def test_rules_for_groups_and_unknown_columns() -> None:
    assert targets.broken_rule("sm90", (1024, 128, 256), 1024) == (
        "1024 groups: torch's sm90 grouped GEMM takes at most 1023")
    assert targets.broken_rule("sm100", (1024, 128, 256), 1024) is None
    assert targets.broken_rule("sm90", (8, 128, 256), 8) is None
    assert targets.broken_rule("emulated", (8, 128, 200), 8) is None
    unknown = ShapeEnv().create_unbacked_symint()
    assert "unknown at compile time" in targets.broken_rule("sm100", (128, unknown), None)
