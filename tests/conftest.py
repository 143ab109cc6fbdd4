"""Shared test setup: the ``gpu`` marker's skip, seeds, a clean Dynamo state per test, and the
shards ``tests/run.py`` runs in parallel (``--shard I/N``, ``--record-durations``)."""

from __future__ import annotations

import collections
import json
import os
import statistics

import pytest
import torch

TIMINGS = os.path.join(os.path.dirname(__file__), "timings.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shard", metavar="I/N", help="run shard I (from 0) of N shards of about equal time")
    parser.addoption("--record-durations", metavar="PATH", help="write each test's seconds to PATH (JSON)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if shard := config.getoption("--shard"):
        index, count = map(int, shard.split("/"))
        chosen = set(_shards(items, count)[index])
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in chosen])
        items[:] = [item for item in items if item.nodeid in chosen]


def _shards(items: list[pytest.Item], count: int) -> list[list[str]]:
    """Node ids in ``count`` shards of about equal recorded time (longest unit first, each to
    the lightest shard). A unit is one test, or a whole file whose tests share a module- or
    session-scoped fixture (splitting it would set that fixture up in every shard)."""
    timings = {}
    if os.path.exists(TIMINGS):
        with open(TIMINGS) as f:
            timings = json.load(f)
    default = statistics.median(timings.values()) if timings else 1.0
    units: dict[str, list[str]] = collections.defaultdict(list)
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs is not None and any(
            d.scope in ("module", "session", "package") for ds in defs.name2fixturedefs.values() for d in ds
            if d.baseid  # conftest/plugin fixtures such as monkeypatch have no module of their own
        )
        units[item.nodeid.split("::")[0] if shared else item.nodeid].append(item.nodeid)
    load = [0.0] * count
    shards: list[list[str]] = [[] for _ in range(count)]
    weight = {u: sum(timings.get(n, default) for n in ids) for u, ids in units.items()}
    for unit in sorted(units, key=lambda u: (-weight[u], u)):
        lightest = load.index(min(load))
        load[lightest] += weight[unit]
        shards[lightest] += units[unit]
    return shards


_durations: dict[str, float] = collections.defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if path := session.config.getoption("--record-durations"):
        with open(path, "w") as f:
            json.dump(_durations, f)


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()


@pytest.fixture
def fp8_aware_allclose(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``torch.library.opcheck``'s schema check compare fp8 inputs.

    Its mutation check compares each input before and after the op with ``torch.allclose``,
    which has no CPU kernel for float8_e4m3fn ("mul_cpu_reduced_float" not implemented). Here fp8
    tensors compare by their bytes instead, which is the bitwise check it intends; every other
    dtype goes to the real ``allclose``. Remove once torch's schema check handles fp8.
    """
    real_allclose = torch.allclose

    def allclose(a: torch.Tensor, b: torch.Tensor, *args: object, **kwargs: object) -> bool:
        if a.dtype == torch.float8_e4m3fn:
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return real_allclose(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "allclose", allclose)


@pytest.fixture
def no_compile_caches() -> None:
    """Inductor and AOTAutograd caches off: a cache hit runs no pass and leaves no report."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield
