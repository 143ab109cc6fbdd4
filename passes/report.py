"""What the passes found and decided: one record per GEMM, one report per compiled graph.

``GemmSite`` is a frozen record of one GEMM (``find_gemms`` makes them), ``HoistSite`` one of an
all-to-all whose rows feed quantized GEMM operands (``hoist_quantize`` makes them); ``Convert``
and the falsy ``Skip`` are decisions; ``PassReport`` collects them for a graph and is what
``mxfp8_compile.last_report()``, the ``mxfp8_rewrite_report`` trace artifact and the dump tool
read.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import enum
import json
import math
from collections.abc import Iterator
from typing import Any


class Role(str, enum.Enum):
    """Which GEMM of a layer a node is (forward ``y = x W^T``, ``dx = dy W``, ``dW = dy^T x``)."""

    FORWARD = "forward"
    DGRAD = "dgrad"
    WGRAD = "wgrad"


class Layout(str, enum.Enum):
    GROUPED_2D3D = "2Dx3D"
    GROUPED_2D2D = "2Dx2D"
    GROUPED_3D3D = "3Dx3D"
    GROUPED_3D2D = "3Dx2D"
    BATCHED = "bmm"  # (E, T, K) x (E, K, N): experts as a batch of equal groups
    DENSE = "dense"


class SkipReason(str, enum.Enum):
    """Why a GEMM stays in high precision, or an all-to-all stays as it was. The value is the
    sentence the report prints."""

    ROLE_DISABLED = "this GEMM role is not in Config.gemms"
    DENSE_DISABLED = "dense linears are off (Config.dense_linears)"
    KEEP_BF16 = "kept in bf16 by policy (Config.keep_bf16_roles, keep_bf16_modules)"
    FQN_EXCLUDED = "module FQN matches Config.exclude_fqns"
    FQN_NOT_INCLUDED = "module FQN matches none of Config.include_fqns"
    DTYPE = "operand dtype is not in Config.operand_dtypes"
    UNSUPPORTED_LAYOUT = "no MX path for this grouped GEMM layout"
    UNSUPPORTED_ARGS = "GEMM arguments the MX path does not take"
    BATCHED_ACTIVATIONS = "a batched GEMM of two activations (attention scores or their gradients): no weight operand"
    GATHERED_WEIGHTS = (
        "weights gathered per token (HF's batched_mm experts, made for generation): convert them by training with "
        "experts_implementation='grouped_mm'"
    )
    TOO_SMALL = "weight has fewer elements than Config.min_gemm_size"
    NOT_FASTER = "predicted no faster in FP8, with the casts it pays for, than in bf16 (Config.cost_model)"
    TARGET_RULE = "the target's FP8 GEMM kernels cannot take these shapes (torch checks them at run time)"
    A2A_WGRAD_DEQUANT = (
        "a2a_wgrad='dequant': its token rows cross an all-to-all as MXFP8 scaled along the hidden "
        "dim; the wgrad runs in bf16 on their dequantized values"
    )
    A2A_NOT_ROW_LOCAL = (
        "the all-to-all's rows also feed an op that needs them in high precision (not row-local, and "
        "not a wgrad), so quantization cannot move above the all-to-all"
    )
    A2A_SYMBOLIC_ROWS = "the all-to-all's row shape (all but dim 0) is symbolic; the hoist needs it static"
    A2A_BF16_FOR_WGRAD = "a2a_wgrad='bf16_a2a': the all-to-all stays in bf16 for the wgrad that reads its rows"
    A2A_PAYLOAD_NOT_MX = (
        "a2a_payloads='all', but this payload cannot cross as MX blocks (it needs a static last dim, a multiple "
        "of 32, and one reader that waits for it)"
    )


@dataclasses.dataclass(frozen=True)
class GemmSite:
    """One GEMM in a graph.

    ``node`` is the node's name; ``output`` selects one output of a node computing several
    GEMMs (HF's ``grouped_mm_fallback_backward``: 0 = dgrad, 1 = wgrad), else None.
    ``shapes`` are the operands' shapes as the GEMM sees them: A (.., K) and B (.., K, N);
    ``contraction`` is the contracted size (symbolic sizes print as their expression).
    """

    node: str
    op: str
    role: Role
    layout: Layout
    shapes: tuple[tuple[str, ...], tuple[str, ...]]
    dtype: str
    fqn: str
    contraction: str
    output: int | None = None
    # Bytes of both operands as the GEMM reads them, and as MXFP8 (1-byte data plus one scale
    # byte per 32; the wgrad's token groups padded to 32 at most); None for symbolic shapes.
    bytes_before: int | None = None
    bytes_after: int | None = None

    @property
    def label(self) -> str:
        return self.node if self.output is None else f"{self.node}[{self.output}]"


@dataclasses.dataclass(frozen=True)
class HoistSite:
    """An all-to-all (``a2a``, a node name) whose rows become the row-quantized A operand of
    GEMMs (``gemms``: their labels), through the row-moving ops ``crossed`` (targets, from the
    all-to-all down). ``wgrads`` are the wgrad GEMMs reading the same rows along tokens and
    ``wgrad_policy`` the ``Config.a2a_wgrad`` applied to them ("" when there are none).

    Bytes on the wire per row: ``row_bytes_before`` as the graph had it, ``row_bytes_after`` as
    MXFP8 data plus its scales (K/32 bytes, or one byte for sm90's rebased rows); ``rows`` is the
    row count (a symbolic size prints as its expression). ``notes`` say how numerics change:
    a dtype cast crossed means the wider values are quantized.
    """

    a2a: str
    backward: bool
    crossed: tuple[str, ...]
    gemms: tuple[str, ...]
    wgrads: tuple[str, ...]
    rows: str
    row_bytes_before: int
    row_bytes_after: int
    wgrad_policy: str = ""
    notes: tuple[str, ...] = ()
    wire_only: bool = False  # quantized around the all-to-all, not for a GEMM (Config.a2a_payloads)

    @property
    def ratio(self) -> float:
        """Bytes after / before; nan when the row shape is symbolic (not counted)."""
        return self.row_bytes_after / self.row_bytes_before if self.row_bytes_before else math.nan

    def describe(self) -> str:
        """One line: where, what moved, the bytes, and the wgrad policy applied."""
        where = f"{self.a2a} ({'backward' if self.backward else 'forward'}, {self.rows} rows)"
        text = f"{where}: {self.row_bytes_before} -> {self.row_bytes_after} B/row ({self.ratio:.2f}x); "
        if self.wire_only:
            return text + "no GEMM reads its rows"
        text += f"crossed {', '.join(self.crossed)}; feeds {', '.join(self.gemms)}"
        if self.wgrads:
            text += f"; wgrad policy {self.wgrad_policy!r} at {', '.join(self.wgrads)}"
        return text


@dataclasses.dataclass(frozen=True)
class Convert:
    """A truthy decision; ``note`` says what the conversion adds (padding), if anything."""

    note: str = ""

    def __bool__(self) -> bool:
        return True

    def __str__(self) -> str:
        return f"converted ({self.note})" if self.note else "converted"


@dataclasses.dataclass(frozen=True)
class Skip:
    """A falsy decision carrying the reason and its specifics."""

    reason: SkipReason
    detail: str = ""

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


Decision = Convert | Skip


@dataclasses.dataclass(frozen=True)
class Entry:
    site: GemmSite
    decision: Decision

    @property
    def converted(self) -> bool:
        return bool(self.decision)


@dataclasses.dataclass(frozen=True)
class HoistEntry:
    site: HoistSite
    decision: Decision

    @property
    def hoisted(self) -> bool:
        return bool(self.decision)


@dataclasses.dataclass
class PassReport:
    """The decisions of one pass run over one graph (a joint training graph or an inference graph)."""

    graph: str  # "training" or "inference"
    target: str
    config: str
    target_why: str = ""  # why this target: the device, or what refused the faster ones
    entries: list[Entry] = dataclasses.field(default_factory=list)
    hoists: list[HoistEntry] = dataclasses.field(default_factory=list)
    # The graph as code before and after the passes; filled only while ``capture_graphs()``
    # is active or TORCH_TRACE is set (rendering a large graph costs compile time).
    graph_before: str | None = None
    graph_after: str | None = None
    # Served from Inductor's cache: these are the decisions made when the artifact was compiled.
    from_cache: bool = False

    def converted(self) -> list[GemmSite]:
        return [e.site for e in self.entries if e.converted]

    def skipped(self) -> list[tuple[GemmSite, Skip]]:
        return [(e.site, e.decision) for e in self.entries if isinstance(e.decision, Skip)]

    def counts(self) -> dict[str, int]:
        """Converted GEMMs per role and skipped GEMMs per reason."""
        out: collections.Counter[str] = collections.Counter()
        for e in self.entries:
            if isinstance(e.decision, Skip):
                out[f"skipped: {e.decision.reason.name}"] += 1
            else:
                out[f"converted: {e.site.role.value} {e.site.layout.value}"] += 1
        return dict(sorted(out.items()))

    def to_text(self) -> str:
        """The decision table: one line per GEMM; then one per all-to-all whose rows feed
        quantized GEMM operands, and the bytes on the wire for those rows."""
        header = ("node", "role", "layout", "shapes (A x B)", "dtype", "bytes", "module", "decision")
        rows = [header]
        for e in self.entries:
            s = e.site
            verdict = str(e.decision) if e.converted else f"skipped: {e.decision}"
            shapes = " x ".join("(" + ", ".join(d) + ")" for d in s.shapes)
            moved = f"{format_bytes(s.bytes_before)} -> {format_bytes(s.bytes_after) if e.converted else 'same'}"
            rows.append((s.label, s.role.value, s.layout.value, shapes, s.dtype, moved, s.fqn or "-", verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        cached = ", from Inductor's cache" if self.from_cache else ""
        lines = [f"mxfp8 rewrite report ({self.graph} graph{cached}, target {self.target}: {self.target_why})"]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        return "\n".join(lines + self._hoist_lines())

    def _hoist_lines(self) -> list[str]:
        if not self.hoists:
            return []
        lines = ["token all-to-alls:"]
        for h in self.hoists:
            if not h.hoisted:
                verdict = f"left as it was: {h.decision}"
            else:
                verdict = "carried quantized for the wire" if h.site.wire_only else "quantization moved ahead"
            lines.append(f"  {h.site.describe()}: {verdict}")
            lines += [f"    note: {note}" for note in h.site.notes]
        before, after = self.wire_row_bytes()
        if before:
            lines.append(f"  bytes on the wire for these rows: {before} -> {after} B/row ({after / before:.2f}x)")
        return lines

    def wire_row_bytes(self) -> tuple[int, int]:
        """Bytes per row of the all-to-alls in ``hoists``, summed: as the graph had them, and
        after the pass (the same for those left as they were)."""
        before = sum(h.site.row_bytes_before for h in self.hoists)
        after = sum(h.site.row_bytes_after if h.hoisted else h.site.row_bytes_before for h in self.hoists)
        return before, after

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "target": self.target,
            "target_why": self.target_why,
            "config": self.config,
            "from_cache": self.from_cache,
            "entries": [
                {
                    **dataclasses.asdict(e.site),
                    "role": e.site.role.value,
                    "layout": e.site.layout.value,
                    "converted": e.converted,
                    **_decision_json(e.decision),
                }
                for e in self.entries
            ],
            "hoists": [
                {
                    **dataclasses.asdict(h.site),
                    "hoisted": h.hoisted,
                    **_decision_json(h.decision),
                }
                for h in self.hoists
            ],
        }

    def __str__(self) -> str:
        return self.to_text()


def _decision_json(decision: Decision) -> dict[str, str | None]:
    if isinstance(decision, Skip):
        return {"reason": decision.reason.name, "detail": str(decision)}
    return {"reason": None, "detail": None}


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.50 KiB``; None (a symbolic size) -> ``?``."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_CAPTURE_GRAPHS: contextvars.ContextVar[bool] = contextvars.ContextVar("mxfp8_capture_graphs", default=False)


@contextlib.contextmanager
def capture_graphs() -> Iterator[None]:
    """Record each graph's code before and after the passes in its report (for the dump tool)."""
    token = _CAPTURE_GRAPHS.set(True)
    try:
        yield
    finally:
        _CAPTURE_GRAPHS.reset(token)


def capturing_graphs() -> bool:
    return _CAPTURE_GRAPHS.get()


# Reports of the most recent compilations, newest last. Compilation is not thread-safe in torch
# either; a bounded deque keeps long training runs from growing it.
_HISTORY: collections.deque[PassReport] = collections.deque(maxlen=256)
_RECORDED = 0  # reports recorded in this process, ever (the history forgets)


def record(report: PassReport) -> None:
    global _RECORDED
    _HISTORY.append(report)
    _RECORDED += 1


def recorded() -> int:
    """How many reports this process has recorded."""
    return _RECORDED


def reports_since(mark: int) -> list[PassReport]:
    """The reports recorded after ``recorded()`` returned ``mark``, oldest first (as many as the
    history still holds). Slicing ``reports()`` by its length instead finds nothing once the
    history is full."""
    count = _RECORDED - mark
    return list(_HISTORY)[-count:] if count > 0 else []


def last_report() -> PassReport | None:
    """The report of the most recently compiled graph, or None if nothing was compiled.

    A graph served from Inductor's caches leaves the report stored when it was compiled, marked
    ``from_cache`` (``mxfp8_compile.report_store``).
    """
    return _HISTORY[-1] if _HISTORY else None


def reports() -> list[PassReport]:
    """Reports of recent compilations (at most 256), oldest first."""
    return list(_HISTORY)


def clear_reports() -> None:
    _HISTORY.clear()


def json_dumps(report: PassReport) -> str:
    return json.dumps(report.to_json(), indent=1)
