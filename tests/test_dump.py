"""mxfp8-dump: the summary, the files, the picture, the reasons, and clear failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import expecttest
import pytest

from mxfp8_compile.tools.dump import main

pytestmark = pytest.mark.slow


def _svg_texts(path: Path) -> str:
    root = ET.parse(path).getroot()  # raises on invalid XML
    return "\n".join(t for t in root.itertext())


class TestExampleDump(expecttest.TestCase):
    def test_example_moe_train(self) -> None:
        import contextlib
        import io
        import json
        import tempfile

        out = Path(tempfile.mkdtemp()) / "dump"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["--example", "moe", "--train", "--out", str(out)])
        self.assertEqual(code, 0)
        summary = (out / "summary.txt").read_text()
        self.assertIn(summary.strip(), stdout.getvalue())
        self.assertExpectedInline(summary, """\
mxfp8-dump: example moe (forward+backward), target emulated (auto: no CUDA device)
graphs rewritten: 1 (training)
GEMMs converted to MXFP8: 120
    12  dgrad 2Dx3D
    28  dgrad dense
    12  forward 2Dx3D
    28  forward dense
    12  wgrad 2Dx2D
    28  wgrad dense
GEMMs kept in high precision: 15
    15  KEEP_BF16: kept in bf16 by policy (Config.keep_bf16_roles, keep_bf16_modules)
operands of the converted GEMMs: 14.25 MiB -> 8.10 MiB
all-to-all payload: no all-to-all in the graphs
saved for backward: 6.85 MiB (bf16 compile) -> 6.65 MiB (with the plugin)
  by dtype: bfloat16 6.79 MiB -> 5.92 MiB, float32 32.50 KiB -> 32.50 KiB, float8_e4m3fn 0 B -> 672.00 KiB, int32 128 B -> 128 B, int64 24.00 KiB -> 24.00 KiB, uint8 0 B -> 21.00 KiB
""")

        graph_dir = out / "graph_0_training"
        for name in ("before.py", "after.py", "decisions.txt", "report.json", "conversion_map.svg",
                     "regions/layers.0.svg", "regions/lm_head.svg"):
            self.assertTrue((graph_dir / name).stat().st_size > 0, name)
        before = (graph_dir / "before.py").read_text()
        after = (graph_dir / "after.py").read_text()
        self.assertEqual(before.count("torch.ops.aten._grouped_mm.default("), 36)
        self.assertEqual(after.count("torch.ops.aten._grouped_mm.default("), 0)
        self.assertEqual(after.count("torch.ops.mxfp8.scaled_grouped_mm.default("), 36)

        # the pictures are valid XML: the map has a cell slice per GEMM, the detail (a picture per
        # layer) a row per GEMM and an MXFP8 GEMM box per converted one; tests/test_render.py
        # checks what they show
        report = json.loads((graph_dir / "report.json").read_text())
        converted = [e for e in report["entries"] if e["converted"]]
        self.assertEqual(len(converted), 120)
        svg = "{http://www.w3.org/2000/svg}"
        cells = [e for e in ET.parse(graph_dir / "conversion_map.svg").getroot().iter(svg + "rect")
                 if e.get("id", "").startswith("gemm-")]
        self.assertEqual(len(cells), len(report["entries"]))
        regions = sorted((graph_dir / "regions").glob("*.svg"))
        self.assertEqual([p.stem for p in regions], ["layers.0", "layers.1", "layers.2", "layers.3", "lm_head"])
        groups = [g for p in regions for g in ET.parse(p).getroot().iter(svg + "g")]
        self.assertEqual(len([g for g in groups if g.get("class") == "row"]), len(report["entries"]))
        self.assertEqual(len([g for g in groups if g.get("class") == "box converted"]), 120)


UNCONVERTIBLE = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(64, 4, bias=False)                 # the router gate: policy
        self.attn = nn.Linear(64, 64, bias=False)                # excluded by --exclude attn
        self.proj = nn.Linear(64, 64, bias=False)                # converted
        self.w = nn.Parameter(torch.randn(4, 64, 64) / 8)        # batched experts: 3Dx3D, no MX path

    def forward(self, x):
        top, _ = self.gate(x).softmax(-1).topk(1)
        h = self.proj(self.attn(x)) * top
        return torch._grouped_mm(h.reshape(4, 16, 64), self.w.transpose(-2, -1))


def make():
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    return Model().bfloat16(), (x,)


def broken():
    raise RuntimeError("cannot build the model: no weights here")


def no_gemms():
    return nn.ReLU(), (torch.randn(8, 8),)
"""


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(UNCONVERTIBLE))
    return path


def test_each_unconverted_gemm_shows_its_reason(factory_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dump"
    assert main([f"{factory_file}:make", "--train", "--exclude", "attn", "--out", str(out)]) == 0
    decisions = (out / "graph_0_training" / "decisions.txt").read_text()
    assert "no MX path for this grouped GEMM layout: 3Dx3D grouped_mm (batched)" in decisions
    assert "module FQN matches Config.exclude_fqns: 'attn' contains 'attn'" in decisions
    assert ("kept in bf16 by policy (Config.keep_bf16_roles, keep_bf16_modules): router: its output picks experts "
            "through aten.topk.default") in decisions
    cells = _svg_texts(out / "graph_0_training" / "conversion_map.svg")
    rows = "\n".join(_svg_texts(p) for p in (out / "graph_0_training" / "regions").glob("*.svg"))
    for reason in ("UNSUPPORTED_LAYOUT", "FQN_EXCLUDED", "KEEP_BF16"):
        assert reason in cells and f"{reason}: " in rows
    summary = capsys.readouterr().out
    assert "UNSUPPORTED_LAYOUT" in summary and "FQN_EXCLUDED" in summary and "KEEP_BF16" in summary


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["mxfp8-dump", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "spec,message",
    [
        ("missing.py:make", "mxfp8-dump: error: no such file: missing.py"),
        ("{file}:nothing", "has no function 'nothing'"),
        ("{file}:broken", "broken() in {file} raised RuntimeError: cannot build the model: no weights here"),
        ("{file}:no_gemms", "no GEMM (_grouped_mm, mm, addmm) in the compiled graphs, nothing to convert"),
        ("{file}", "expected FILE.py:FACTORY"),
        ("{text}:make", "is not a Python file (expected FILE.py:FACTORY)"),
    ],
)
def test_bad_targets_fail_clearly_without_a_traceback(factory_file: Path, tmp_path: Path, spec: str, message: str) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not python")
    done = _cli(spec.format(file=factory_file, text=text), "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert message.format(file=factory_file) in done.stderr
    assert "Traceback" not in done.stderr and "(--debug shows the traceback)" in done.stderr


def test_debug_shows_the_traceback(factory_file: Path, tmp_path: Path) -> None:
    done = _cli(f"{factory_file}:broken", "--debug", "--out", str(tmp_path / "o"))
    assert done.returncode == 1 and "Traceback" in done.stderr and "no weights here" in done.stderr


TRACED = """
import torch, mxfp8_compile
def fn(x, w, offs):
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
args = (torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(2, 32, 64, dtype=torch.bfloat16),
        torch.tensor([30, 64], dtype=torch.int32))
torch.compile(fn, backend=mxfp8_compile.backend(inductor=False))(*args)
"""


def test_trace_artifacts_and_the_plugin_log(tmp_path: Path) -> None:
    env = {**os.environ, "TORCH_TRACE": str(tmp_path), "MXFP8_COMPILE_LOG": "INFO"}
    done = subprocess.run([sys.executable, "-c", TRACED], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "mxfp8 rewrite report (inference graph, target emulated: auto: no CUDA device)" in done.stderr  # the log
    trace = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    for artifact in ("mxfp8_rewrite_report", "mxfp8_graph_before", "mxfp8_graph_after"):
        assert f'"name": "{artifact}"' in trace
