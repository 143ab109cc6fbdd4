"""FX passes on aten graphs: find, rewrite and report MXFP8 GEMMs, and move their quantization
ahead of all-to-alls (installed as ``mxfp8_compile.passes``).

``MXJointPass`` is what Inductor's ``joint_custom_pre_pass`` hook (and the backend's
AOTAutograd-only mode) runs on the joint training graph, or on the inference graph. Its
``uuid()`` hashes the sources of the passes, the lowerings and the ops together with the
config, so that Inductor's FX graph cache never replays an artifact made by other code or
another config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from mxfp8_compile.config import Config
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes.cost_policy import apply_cost_policy
from mxfp8_compile.passes.find_gemms import apply_target_rules, find_gemms
from mxfp8_compile.passes.hoist_quantize import apply_hoists, plan_hoists
from mxfp8_compile.passes.pin_layouts import pin_kept_grouped_layouts
from mxfp8_compile.passes.quantize_payloads import quantize_other_payloads
from mxfp8_compile.passes.rewrite_gemms import rewrite_gemms

_log = logging.getLogger("mxfp8_compile")


def _source_files() -> tuple[str, ...]:
    import mxfp8_compile
    import mxfp8_compile.lowering

    package = Path(mxfp8_compile.__file__).parent
    roots = [package, Path(__file__).parent, Path(mxfp8_compile.lowering.__file__).parent]
    return tuple(sorted({str(p) for root in roots for p in root.rglob("*") if p.suffix == ".py"}))


def pass_uuid(config: Config, files: tuple[str, ...] | None = None) -> str:
    """Hash of the contents of the plugin's sources (``files``, by default all of them) and
    the config. Read on every call: torch's ``get_hash_for_files`` memoizes by path."""
    digest = hashlib.sha256(repr(config).encode())
    for path in files or _source_files():
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def run_joint_passes(graph: fx.Graph, config: Config) -> _report.PassReport:
    """Find and rewrite the GEMMs of one graph, move their quantization ahead of the
    all-to-alls that deliver their rows (and, if the config says so, carry the other token
    all-to-alls in MXFP8); record and emit the report."""
    import mxfp8_compile.ops  # noqa: F401  (the rewrite inserts them)
    from mxfp8_compile.lowering.targets import check_weight_blocks, choose_target

    training = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
    capture = _report.capturing_graphs() or bool(os.environ.get("TORCH_TRACE"))
    before = graph.python_code("self").src if capture else None
    matches = find_gemms(graph, config)
    converted = [m for m in matches if m.decision]
    choice = choose_target(config, converted[0].a.node.meta["val"].device) if converted else None
    if choice:
        check_weight_blocks(config, choice)
    target = choice.target if choice else "none"
    matches = apply_target_rules(matches, target)
    matches = apply_cost_policy(matches, config, target)
    hoists, matches = plan_hoists(matches, config, target)  # may keep wgrads in bf16
    moved = frozenset(s.node for h in hoists if h.decision for s in h.steps)
    rewrite_gemms(graph, matches, config, target, keep_apart=moved)
    apply_hoists(graph, hoists)
    carried = quantize_other_payloads(graph, config, {h.site.a2a for h in hoists})
    if any(m.decision for m in matches):
        pin_kept_grouped_layouts(graph)
    graph.lint()
    rep = _report.PassReport(
        graph="training" if training else "inference",
        target=target,
        target_why=choice.why if choice else "no GEMM to convert",
        config=repr(config),
        entries=[_report.Entry(m.site, m.decision) for m in matches],
        hoists=[_report.HoistEntry(h.site, h.decision) for h in hoists] + carried,
        graph_before=before,
        graph_after=graph.python_code("self").src if capture else None,
    )
    _report.record(rep)
    _log.info("%s", rep.to_text())
    artifacts = {"mxfp8_rewrite_report": ("json", lambda: json.dumps(rep.to_json()))}
    if capture:
        artifacts["mxfp8_graph_before"] = ("string", lambda: rep.graph_before)
        artifacts["mxfp8_graph_after"] = ("string", lambda: rep.graph_after)
    for name, (encoding, payload) in artifacts.items():
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda name=name, encoding=encoding: {"name": name, "encoding": encoding},
            payload_fn=payload,
        )
    return rep


class MXJointPass(CustomGraphPass):
    """The plugin's joint-graph pass for one ``Config``."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self, graph: fx.Graph) -> None:
        run_joint_passes(graph, self.config)

    def uuid(self) -> str:
        return pass_uuid(self.config)

    def __repr__(self) -> str:
        return f"MXJointPass({self.config!r})"
