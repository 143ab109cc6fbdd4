"""Shared test setup: the ``gpu`` marker's skip, seeds, and a clean Dynamo state per test."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
