"""mxfp8-dump plans for a GPU target from a CPU, checks --out before compiling, and says why a
compilation failed in its one line."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import mxfp8_compile
from mxfp8_compile.tools.dump import main


@pytest.mark.parametrize("target,ops", [("sm90", ("quantize_rebase",)),
                                        ("sm100", ("quantize_rows_and_token_groups", "to_blocked"))])
def test_a_cpu_plans_for_a_gpu_target(target: str, ops: tuple[str, ...], tmp_path: Path, capsys) -> None:
    out = tmp_path / "dump"  # the example's tensors are on the CPU, on any machine
    # (--no-cost-model: every GEMM rewritten; the cost model would keep the small example's in bf16)
    assert main(["--example", "moe", "--layers", "1", "--train", "--target", target, "--no-cost-model",
                 "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith(f"mxfp8-dump: example moe (forward+backward), target {target} "
                              f"(Config(target='{target}'), planned on cpu: what an {target.upper()} GPU")
    after = (out / "graph_0_training" / "after.py").read_text()
    for op in ops:
        assert f"torch.ops.mxfp8.{op}" in after
    # Outside the dump, a forced GPU target on a CPU is still refused.
    with pytest.raises(Exception, match=rf"Config\(target='{target}'\) needs an {target.upper()} GPU"):
        model, (x,) = mxfp8_compile.examples.moe.build(mxfp8_compile.examples.moe.MoEConfig(layers=1))
        torch._dynamo.reset()
        torch.compile(model, backend=mxfp8_compile.backend(mxfp8_compile.Config(target=target), inductor=False))(x)


@pytest.mark.parametrize("kind", ["file", "foreign", "unwritable"])
def test_a_bad_out_is_refused_before_compiling(kind: str, tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("x")
    elif kind == "foreign":
        out.mkdir()
        (out / "notes.md").write_text("mine")
    else:
        out = Path("/proc/no/such/dir")
    monkeypatch.setattr(mxfp8_compile.tools.dump, "dump", lambda *a, **k: pytest.fail("compiled before the check"))
    assert main(["--example", "moe", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    expected = {"file": "is a file; give a directory", "foreign": "holds files that are not a dump (notes.md)",
                "unwritable": "cannot be written"}[kind]
    assert message.startswith(f"mxfp8-dump: error: --out {out} {expected}")
    if kind == "foreign":
        assert (out / "notes.md").read_text() == "mine"


def test_a_reused_out_holds_only_the_new_dump(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    assert main(["--example", "moe", "--layers", "1", "--train", "--out", str(out)]) == 0
    assert (out / "graph_0_training").is_dir()
    assert main(["--example", "moe", "--layers", "1", "--out", str(out)]) == 0  # forward only now
    assert sorted(p.name for p in out.iterdir()) == ["graph_0_inference", "summary.txt"]
    assert "(forward)" in (out / "summary.txt").read_text()


def test_a_failed_compilation_names_its_root_cause(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("the pass broke here")

    monkeypatch.setattr(importlib.import_module("mxfp8_compile.passes.find_gemms"), "module_roles", broken)
    assert main(["--example", "moe", "--layers", "1", "--out", str(tmp_path / "d")]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress lines
    assert last.startswith("mxfp8-dump: error: compiling example moe failed: RuntimeError: the pass broke here")


def test_dump_takes_a_bare_tensor() -> None:
    linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    result = mxfp8_compile.dump(linear, torch.randn(16, 64, dtype=torch.bfloat16), train=False)
    (report,) = result.reports
    assert [(e.site.shapes, e.converted) for e in report.entries] == [((("16", "64"), ("64", "32")), True)]


def test_dump_after_the_report_history_is_full() -> None:
    # a long session fills reports()' bounded history; the dump still finds its own reports
    from mxfp8_compile.passes import report as _report

    for _ in range(300):
        _report.record(_report.PassReport(graph="inference", target="emulated", config=""))
    linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    result = mxfp8_compile.dump(linear, torch.randn(16, 64, dtype=torch.bfloat16), train=False)
    (report,) = result.reports
    assert [e.converted for e in report.entries] == [True]


def test_a_cpu_shows_what_the_sm90_cost_model_keeps(tmp_path: Path, capsys) -> None:
    # the example's GEMMs (dim 128) are far too small to pay for their casts on an H100
    out = tmp_path / "dump"
    assert main(["--example", "moe", "--layers", "1", "--train", "--target", "sm90", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "GEMMs converted to MXFP8: 0\n" in summary
    assert "NOT_FASTER: predicted no faster in FP8" in summary and "(--no-cost-model converts them)" in summary
    decisions = (out / "graph_0_training" / "decisions.txt").read_text()
    ratios = [float(r) for r in re.findall(r"predicted (\d+\.\d+)x: bf16", decisions)]
    assert len(ratios) == 30 and max(ratios) < 1.0
