"""Reports that survive Inductor's caches.

A graph served from AOTAutograd's cache (on by default, and across processes) runs no pass, so
it would leave no report, and ``last_report()`` would answer from whatever compiled last. Every
compilation through Inductor with the plugin therefore goes through ``compile_reporting``: the
reports a compilation makes are stored beside Inductor's artifacts, keyed by what the artifact
is keyed by (the Dynamo graph, its inputs, the plugin's sources and config, torch's version),
and a compilation that makes none (a cache hit) records the stored ones again, marked
``from_cache``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from mxfp8_compile.config import Config
from mxfp8_compile.passes import pass_uuid
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes._graph import module_fqn

CompiledFn = Callable[..., Any]
_REPORTING = contextvars.ContextVar("mxfp8_compile_reporting", default=False)


def store_dir() -> Path:
    """Where the reports go: beside Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``), so that
    clearing one clears both."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "mxfp8_reports"


def graph_key(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config) -> str:
    """The key of a Dynamo graph's reports: its code, its inputs' metadata, the module each node
    came from (two identical layers compiled apart differ only there), the plugin and torch."""
    digest = hashlib.sha256()
    for part in (torch.__version__, pass_uuid(config), gm.code):
        digest.update(part.encode())
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            described = (tuple(map(str, x.shape)), tuple(map(str, x.stride())), x.dtype, x.device.type,
                         x.requires_grad)
        else:
            described = (type(x).__name__, str(x))
        digest.update(repr(described).encode())
    digest.update(repr([module_fqn(n) for n in gm.graph.nodes]).encode())
    return digest.hexdigest()


def _aot_cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_hit"]


def compile_reporting(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config, compile: Callable[[], CompiledFn]
) -> CompiledFn:
    """``compile()`` (an Inductor compilation of ``gm`` with the plugin's passes), storing the
    reports it makes, or recording the stored ones when it was served from a cache."""
    if _REPORTING.get():  # enabled()'s hook around our backend's own compile_fx: one is enough
        return compile()
    made_before, hits_before = _report.recorded(), _aot_cache_hits()
    token = _REPORTING.set(True)
    try:
        compiled = compile()
    finally:
        _REPORTING.reset(token)
    made = _report.reports_since(made_before)
    key = graph_key(gm, example_inputs, config)
    if made:
        _store(key, made)
    elif _aot_cache_hits() > hits_before:
        stored = _load(key)
        if stored is None:
            warnings.warn(
                "mxfp8_compile: a graph came from Inductor's cache with no stored report (compiled before the "
                "report store existed, or the store was removed): last_report() has nothing for it. "
                "TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 compiles it again and makes one.",
                stacklevel=2,
            )
        for rep in stored or ():
            _report.record(dataclasses.replace(rep, from_cache=True))
    return compiled


def _store(key: str, reports: list[_report.PassReport]) -> None:
    path = store_dir() / f"{key}.pkl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(reports))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as e:
        warnings.warn(f"mxfp8_compile: could not store the rewrite report in {path.parent}: {e}", stacklevel=3)


def _load(key: str) -> list[_report.PassReport] | None:
    try:
        return pickle.loads((store_dir() / f"{key}.pkl").read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None
