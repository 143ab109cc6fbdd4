"""Inductor's caches on: a different config or pass source is a different key; the same hits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile.passes import MXJointPass, _source_files, pass_uuid


def test_uuid_covers_passes_lowerings_and_ops() -> None:
    files = {Path(f).relative_to(Path(f).parents[1]).as_posix() for f in _source_files()}
    for expected in ("passes/find_gemms.py", "passes/rewrite_gemms.py", "lowering/targets.py",
                     "mxfp8_compile/ops.py", "mxfp8_compile/numerics.py", "mxfp8_compile/config.py"):
        assert expected in files


def test_uuid_changes_with_the_config_not_with_an_equal_one() -> None:
    assert MXJointPass(Config()).uuid() == MXJointPass(Config()).uuid()
    assert MXJointPass(Config()).uuid() != MXJointPass(Config(scale_mode="floor")).uuid()
    assert MXJointPass(Config()).uuid() != MXJointPass(Config(exclude_fqns=("attn",))).uuid()


def test_uuid_changes_with_the_source_of_a_pass(tmp_path: Path) -> None:
    copies = []
    for f in _source_files():
        dst = tmp_path / Path(f).parent.name / Path(f).name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(f, dst)
        copies.append(str(dst))
    before = pass_uuid(Config(), tuple(copies))
    rewrite = next(c for c in copies if c.endswith("rewrite_gemms.py"))
    Path(rewrite).write_text(Path(rewrite).read_text() + "\n# edited\n")
    assert pass_uuid(Config(), tuple(copies)) != before


def _cache_outcome() -> str:
    hit = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    miss = counters["inductor"]["fxgraph_cache_miss"]
    assert not (hit and miss), dict(counters["inductor"])
    return "hit" if hit else "miss"


@pytest.mark.slow
def test_same_config_hits_the_cache_another_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from torch._inductor import config as inductor_config

    def fn(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).relu()

    args = (torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(2, 32, 64, dtype=torch.bfloat16),
            torch.tensor([30, 64], dtype=torch.int32))

    def compile_once(config: Config) -> str:
        torch._dynamo.reset()
        counters.clear()
        with inductor_config.patch(fx_graph_cache=True):
            torch.compile(fn, backend=mxfp8_compile.backend(config))(*args)
        return _cache_outcome()

    assert compile_once(Config()) == "miss"  # cold: the pass runs
    report = mxfp8_compile.last_report()
    assert not report.from_cache
    assert compile_once(Config()) == "hit"  # the same config: served from the cache, no pass ran
    cached = mxfp8_compile.last_report()  # ... and the report stored with it stands for it
    assert cached is not report and cached.from_cache
    assert cached.entries == report.entries and len(cached.converted()) == 1
    assert "(inference graph, from Inductor's cache, target emulated" in cached.to_text()
    assert compile_once(Config(scale_mode="floor")) == "miss"  # another config: a new key
    assert mxfp8_compile.last_report().config == repr(Config(scale_mode="floor"))


CACHED_RUN = """
import torch, mxfp8_compile
torch.manual_seed(0)
def fn(x, w, offs):
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
args = (torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(2, 32, 64, dtype=torch.bfloat16),
        torch.tensor([30, 64], dtype=torch.int32))
out = torch.compile(fn, backend="mxfp8")(*args).float().sum().item()
report = mxfp8_compile.last_report()
print(out, report.from_cache, len(report.converted()))
"""


def _run_twice(script: str, cache_dir: Path) -> tuple[list[str], list[str]]:
    """The last three words ``script`` prints, in two processes sharing one Inductor cache."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    cold, warm = (r.stdout.split()[-3:] for r in runs)
    return cold, warm


@pytest.mark.slow
def test_an_artifact_from_the_cache_runs_in_a_fresh_process(tmp_path: Path) -> None:
    # The cached graph calls mxfp8:: ops while no pass runs to register them. The second process
    # compiles nothing, yet its report is the first one's (the forward only).
    (cold, cold_cached, cold_converted), (warm, warm_cached, warm_converted) = _run_twice(CACHED_RUN, tmp_path)
    assert cold == warm and (cold_cached, warm_cached) == ("False", "True") and cold_converted == warm_converted == "1"


ENABLED_RUN = """
import torch, mxfp8_compile
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).bfloat16()
with mxfp8_compile.enabled():
    torch.compile(model)(torch.randn(32, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
report = mxfp8_compile.last_report()
print(report.from_cache, len(report.converted()), len(report.entries))
"""


@pytest.mark.slow
def test_enabled_reports_the_same_decisions_when_the_second_run_hits_the_cache(tmp_path: Path) -> None:
    # README's "Using it": the second run of a script compiles nothing and still has its report.
    cold, warm = _run_twice(ENABLED_RUN, tmp_path)
    assert cold[0] == "False" and warm[0] == "True"
    assert cold[1:] == warm[1:] == ["5", "5"]  # two forwards, two wgrads, one dgrad (x needs none)
