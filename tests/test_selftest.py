"""The self-check (``python -m mxfp8_compile --selftest``) on the CPU: the sm90 and sm100 targets'
emulations through the same harness the GPU runs, and what it says when a target computes wrong.
On the device it runs for real (tests/test_gpu.py, benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.__main__ import main
from mxfp8_compile.lowering import targets
from mxfp8_compile.self_check import SIZES, selftest

# the module: the package exports its function under the same name
rewrite_gemms = importlib.import_module("mxfp8_compile.passes.rewrite_gemms")


def _run(target: str) -> tuple[bool, list[str]]:
    lines: list[str] = []
    return selftest("cpu", target, print_fn=lines.append), lines


@pytest.mark.parametrize("target,cases", [("sm90", 14), ("sm100", 22)])
def test_every_case_passes_on_the_targets_emulation(target: str, cases: int) -> None:
    passed, lines = _run(target)
    assert passed, "\n".join(lines)
    assert lines[-1].startswith(f"self-check passed: {cases} of {cases} cases")
    results = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert len(results) == cases and all(line.startswith("PASS") for line in results)
    for mode in ("rceil", "floor"):
        for role in ("forward", "dgrad", "wgrad"):
            assert any(f"{target} {mode} grouped" in line and f"{role}: SQNR" in line for line in results)
            assert any(f"{target} {mode} dense {role}: SQNR" in line for line in results)
    assert f"groups {list(SIZES)}" in "\n".join(results)


def _corrupt(monkeypatch: pytest.MonkeyPatch, target: str, when: object = lambda config: True) -> None:
    """Make ``target``'s GEMMs compute a wrong result (where ``when(config)``): what a GPU whose
    kernels misbehave would give."""
    emit = rewrite_gemms._EMITTERS[target]

    def wrong(m: object, config: Config, n: object) -> object:
        out = emit(m, config, n)
        return n.call(torch.ops.aten.mul.Tensor, out, 1.5) if when(config) else out

    monkeypatch.setitem(rewrite_gemms._EMITTERS, target, wrong)


def test_a_wrong_gemm_fails_its_cases_and_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _corrupt(monkeypatch, "sm90")
    passed, lines = _run("sm90")
    assert not passed and lines[-1].startswith("self-check FAILED (12 failed): 2 of 14 cases")
    assert ("FAIL  sm90 rceil grouped (groups [0, 1, 31, 33, 130, 0]) forward: "
            "SQNR 6.0 dB against emulated (bar 35)") in lines
    assert main(["--selftest", "sm90"]) == 1
    assert "self-check FAILED" in capsys.readouterr().out


def test_ragged_groups_that_run_wrong_are_named_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A B300 (an unproven capability) whose MX GEMM gets ragged token groups wrong.
    monkeypatch.setenv("MXFP8_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(targets, "device_capability", lambda device: (10, 3))
    cuda = torch.device("cuda", 0)
    assert targets.select_target(Config(), cuda) == "emulated"  # not proven yet
    _corrupt(monkeypatch, "sm100", lambda config: config.sm100_ragged_groups)
    passed, lines = _run("sm100")
    assert not passed
    assert "token groups on this device: padded run right, ragged WRONG" in lines
    assert all(line.startswith("PASS") for line in lines if "ragged groups" not in line and line[:4] in ("PASS", "FAIL"))
    assert targets.selftest_record((10, 3)) == {"padded": True, "ragged": False}
    assert targets.select_target(Config(), cuda) == "sm100"
    assert targets.select_target(Config(sm100_ragged_groups=True), cuda) == "emulated"


def test_the_command_on_a_cpu_has_nothing_to_check(capsys: pytest.CaptureFixture) -> None:
    assert main(["--selftest"]) == 0
    out = capsys.readouterr().out
    assert "nothing to check: this device runs the emulated target, which is the reference itself" in out
    assert mxfp8_compile.selftest is selftest
