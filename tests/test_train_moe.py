"""benchmarks/train_moe.py's CPU dry run: the tiny preset, a few steps; the H100 runs are in
benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import plot_training  # noqa: E402
from train_moe import load_text, memory_by_phase, write_loss_plot  # noqa: E402


def test_dry_run_of_two_seeds_writes_the_log_plot_and_paired_summary(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "train_moe.py", "--preset", "tiny", "--steps", "4", "--eval-every", "2",
         "--runs", "bf16", "mxfp8_experts", "--seeds", "0", "1", "--max-bytes", "200000", "--out", str(tmp_path)],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["run"], r["step"]) for r in rows] == [
        (seed, run, str(s)) for seed in "01" for run in ("bf16", "mxfp8_experts") for s in range(4)]
    held = [float(r["heldout_loss"]) for r in rows if r["heldout_loss"]]
    assert len(held) == 8 and all(4.0 < h < 6.0 for h in held)  # ln 256 = 5.5 at the start
    first = {r["seed"]: r["train_loss"] for r in rows if r["run"] == "bf16" and r["step"] == "0"}
    assert first["0"] != first["1"]  # each seed its own initial weights and batches
    if plot_training.have_matplotlib():
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "loss.png skipped: matplotlib is not installed" in done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| mxfp8_experts | 1 |" in summary
    assert re.search(r"mxfp8_experts against bf16: held-out gap [+-]\d+\.\d\d% ± \d+\.\d\d% .*seeds 0, 1: "
                     r"[+-]\d+\.\d\d%, [+-]\d+\.\d\d%\)", summary), summary


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(plot_training, "have_matplotlib", lambda: False)
    write_loss_plot([{"run": "bf16", "step": 0, "train_loss": 5.5, "heldout_loss": ""}], tmp_path / "loss.png", "")
    assert not (tmp_path / "loss.png").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss.png skipped: matplotlib is not installed" in err
    assert 'pip install -e ".[plots]"' in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU: it measures")
def test_memory_refuses_the_cpu() -> None:
    done = subprocess.run([sys.executable, "train_moe.py", "--preset", "tiny", "--memory"],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "run it on a GPU" in done.stderr, done.stderr[-2000:]


class _FakeAllocator:
    """CUDA's peak statistics on the CPU: each peak read is 1 GiB above the last (a new value per
    measured call, so a call measured twice or not at all shows)."""

    def __init__(self) -> None:
        self.reads = 0

    def max_memory_allocated(self, device: torch.device) -> int:
        self.reads += 1
        return self.reads * 2**30


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_memory_reports_warm_up_steps_evaluation_and_phases(mode: str | None, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    allocator = _FakeAllocator()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", allocator.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * 2**29)
    args = argparse.Namespace(preset="tiny", seeds=[0], lr=1e-3, mode=mode)
    memory_by_phase("bf16", args, load_text(200_000), torch.device("cpu"))
    line = capsys.readouterr().out.strip()
    head = ("bf16: peak (GiB) in warm-up steps 1.00, 2.00, 3.00; in the first held-out evaluation 4.00; "
            "allocated at a later step's start 2.50; ")
    if mode is None:
        assert line == head + "its peak by phase: forward and loss 5.00, backward 6.00, clip and AdamW 7.00"
    else:
        assert line == head + "its phases are CUDA graph replays, which allocate nothing"
