"""Move row-local quantization ahead of the all-to-all that delivers its rows (DESIGN section 8).

A GEMM's A operand quantized in blocks of 32 along its last dim (``mxfp8.quantize(x, -1)``, or
sm90's ``mxfp8.quantize_rebase(x)`` with one scale per row) has its scales in the same rows as
its data, so the quantization commutes with every op that moves whole rows. When such an
operand's rows come out of an all-to-all, the quantization moves above it, and data and scales
cross the collective as uint8 (gloo rejects fp8, NCCL rejects e8m0) with the same splits::

    t = all_to_all_single(x, out, in, g)             q, s = mxfp8.quantize(x, -1, mode)
    w = wait_tensor(t)                               d = wait_tensor(all_to_all_single(q.view(u8), out, in, g))
    p = cat([w, zeros(1, K)])                 ->     t = wait_tensor(all_to_all_single(s, out, in, g))
    r = index(p, [perm])                             pd = cat([d, zeros(1, K) u8]); ps = cat([t, zeros(1, K/32) u8])
    q, s = mxfp8.quantize(r, -1, mode)               q = index(pd, [perm]).view(e4m3); s = index(ps, [perm])

The ops rows move through (``_row_args``): ``wait_tensor``, ``all_to_all_single``, float casts
(the quantization then reads the values before the cast: reported), clone/alias, views keeping
the last dim, ``index``/``index_select``/``slice``/``cat``/``slice_scatter`` on dim 0. Other
inputs of ``cat``/``slice_scatter`` are quantized where they are, zero fills become zero bytes
(what quantizing zeros gives: data 0, scale byte 0).

Weight-gradient GEMMs read the same rows along tokens, which row scales cannot serve, so
``Config.a2a_wgrad`` decides: dequantize for a bf16 wgrad (the GEMM is then not converted),
dequantize and requantize along tokens (MXFP8 wgrad), or keep the all-to-all in bf16. That
changes a GEMM decision, so the pass runs in two steps around ``rewrite_gemms``:
``plan_hoists`` finds and checks the all-to-alls on the GEMM records, ``apply_hoists`` moves the
quantize nodes the rewrite inserted for those GEMMs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mxfp8_compile.config import Config
from mxfp8_compile.numerics import BLOCK_SIZE, HIGH_PRECISION_DTYPES
from mxfp8_compile.passes._graph import insert_call, insert_multi, is_backward
from mxfp8_compile.passes.find_gemms import GemmMatch
from mxfp8_compile.passes.report import Convert, Decision, HoistSite, Layout, Skip, SkipReason

aten, mxfp8 = torch.ops.aten, torch.ops.mxfp8
c10d = torch.ops._c10d_functional
_U8, _E4M3 = torch.uint8, torch.float8_e4m3fn


def a2a_targets() -> tuple[object, ...]:
    # Older torch traced the differentiable funcol op under its own namespace.
    legacy = getattr(getattr(torch.ops, "_c10d_functional_autograd", None), "all_to_all_single", None)
    return (c10d.all_to_all_single.default,) + ((legacy.default,) if legacy is not None else ())


SHAPE_ONLY = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}
_TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}


def _row_quantize_targets() -> tuple[object, ...]:
    """The row-local quantize ops (looked up when used: the ops register on first compile)."""
    return mxfp8.quantize.default, mxfp8.quantize_rebase.default


# --------------------------------------------------------------------------------------------
# Which ops move whole rows, and along which arguments.
# --------------------------------------------------------------------------------------------


def _val(node: fx.Node) -> Any:
    """The node's fake value (a tensor for every node the pass looks at, a SymInt for sizes)."""
    return node.meta.get("val")


def _dim_is_0(node: fx.Node, position: int) -> bool:
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    return dim % _val(node).dim() == 0


def _is_zero_fill(node: object) -> bool:
    """A tensor of zeros: ``full(shape, 0)``, what Inductor's decompositions make of ``zeros``,
    ``new_zeros`` and ``zeros_like``."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.full.default
            and node.args[1] == 0)


def _keeps_last_dim(node: fx.Node) -> bool:
    src, out = _val(node.args[0]), _val(node)
    return out.dim() >= 2 and bool(statically_known_true(out.shape[-1] == src.shape[-1]))


def _float_cast(node: fx.Node) -> bool:
    if node.target == aten._to_copy.default and set(node.kwargs) - {"dtype", "memory_format"}:
        return False  # a device or layout change is not a plain cast
    return _val(node.args[0]).dtype in HIGH_PRECISION_DTYPES


def _single_row_index(node: fx.Node) -> bool:
    indices = node.args[1]
    return (
        len(indices) == 1 and isinstance(indices[0], fx.Node)
        and _val(indices[0]).dim() == 1 and not _val(indices[0]).dtype.is_floating_point
        and _val(indices[0]).dtype != torch.bool
    )


# target -> (positions of the arguments holding rows, the condition for the op to move whole rows)
_Rule = tuple[tuple[int, ...], Callable[[fx.Node], bool]]
_ALWAYS: Callable[[fx.Node], bool] = lambda node: True
_RULES: dict[object, _Rule] = {
    c10d.wait_tensor.default: ((0,), _ALWAYS),
    aten.clone.default: ((0,), _ALWAYS),
    aten.alias.default: ((0,), _ALWAYS),
    torch.ops.prims.convert_element_type.default: ((0,), _float_cast),
    aten._to_copy.default: ((0,), _float_cast),
    aten.view.default: ((0,), _keeps_last_dim),
    aten.reshape.default: ((0,), _keeps_last_dim),
    aten._unsafe_view.default: ((0,), _keeps_last_dim),
    aten.index.Tensor: ((0,), _single_row_index),
    aten.index_select.default: ((0,), lambda n: _dim_is_0(n, 1)),
    aten.slice.Tensor: ((0,), lambda n: _dim_is_0(n, 1)),
    aten.cat.default: ((0,), lambda n: _dim_is_0(n, 1)),  # position 0 is the list of tensors
    aten.slice_scatter.default: ((0, 1), lambda n: _dim_is_0(n, 2)),
    **{target: ((0,), _ALWAYS) for target in a2a_targets()},
}
_IDENTITY = {
    c10d.wait_tensor.default, aten.clone.default, aten.alias.default,
    torch.ops.prims.convert_element_type.default, aten._to_copy.default,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _row_args(node: fx.Node) -> list[fx.Node]:
    """The inputs ``node`` moves whole rows of (each output row is a row of one of them), or []
    if it is not such an op. Rows are everything but the last dim, on a float tensor >= 2D."""
    rule = _RULES.get(node.target) if node.op == "call_function" else None
    val = _val(node)
    if rule is None or not isinstance(val, torch.Tensor) or val.dim() < 2:
        return []
    if val.dtype not in HIGH_PRECISION_DTYPES or not rule[1](node):
        return []
    args: list[fx.Node] = []
    for position in rule[0]:
        arg = node.args[position]
        args += arg if isinstance(arg, (list, tuple)) else [arg]
    return args


@dataclasses.dataclass(frozen=True)
class Step:
    """One row-moving op on the way from the all-to-all to the GEMM operand: ``node``, whose
    rows come from ``source`` (its other row inputs, if any, are quantized where they are)."""

    node: fx.Node
    source: fx.Node


def _path_to_a2a(node: fx.Node) -> list[Step] | None:
    """Steps from ``node`` up through row-moving ops to the topmost all-to-all above it, bottom
    first, or None when no all-to-all is reachable that way."""
    for source in _row_args(node):
        if _is_zero_fill(source):
            continue
        above = _path_to_a2a(source)
        if above is not None:
            return [Step(node, source), *above]
        if node.target in a2a_targets():
            return [Step(node, source)]
    return None


# --------------------------------------------------------------------------------------------
# Plan: on the GEMM records, before the rewrite.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HoistPlan:
    """An all-to-all whose rows feed converted GEMM A operands; ``steps`` run from the
    all-to-all (``steps[0]``, reading ``top``) down to the last row-moving op; ``wgrads`` read
    the same rows along tokens."""

    site: HoistSite
    decision: Decision
    top: fx.Node
    steps: tuple[Step, ...]
    wgrads: tuple[GemmMatch, ...]


@dataclasses.dataclass(frozen=True)
class _Readers:
    rows: tuple[GemmMatch, ...]  # converted GEMMs contracting the rows along their last dim
    tokens: tuple[GemmMatch, ...]  # wgrads contracting them along tokens


def plan_hoists(
    matches: list[GemmMatch], config: Config, target: str
) -> tuple[list[HoistPlan], list[GemmMatch]]:
    """One plan per all-to-all whose rows become the row-quantized A operand of a converted
    GEMM, and the matches with ``Config.a2a_wgrad`` applied (``"dequant"`` keeps the wgrads that
    read hoisted rows in bf16)."""
    by_node: dict[fx.Node, list[GemmMatch]] = {}
    for m in matches:
        by_node.setdefault(m.node, []).append(m)
    plans: dict[fx.Node, HoistPlan] = {}
    for m in matches:
        if not (m.decision and _reads_rows(m)):
            continue
        path = _path_to_a2a(m.a.node)
        if path is None or path[-1].node in plans:
            continue
        steps = tuple(reversed(path))
        plans[steps[0].node] = _plan(steps, by_node, config, target)
    dequantized = {
        wgrad.site.label: plan.site.a2a
        for plan in plans.values() if plan.decision and config.a2a_wgrad == "dequant"
        for wgrad in plan.wgrads
    }
    matches = [
        dataclasses.replace(m, decision=Skip(SkipReason.A2A_WGRAD_DEQUANT, f"rows from {dequantized[m.site.label]}"))
        if m.decision and m.site.label in dequantized else m
        for m in matches
    ]
    return list(plans.values()), matches


def _reads_rows(m: GemmMatch) -> bool:
    """Whether ``m`` contracts its A operand along the last dim, as stored (row-local)."""
    # (a padded contraction casts the padded copy, which the hoist cannot carry)
    return m.site.layout in (Layout.GROUPED_2D3D, Layout.DENSE) and not m.a.transposed and not m.pads_contraction


def _reads_tokens(m: GemmMatch, node: fx.Node) -> bool:
    """Whether wgrad ``m`` contracts ``node`` (tokens, features) along its tokens."""
    if m.site.layout is not Layout.GROUPED_2D2D:
        return False
    return (m.b.node is node and not m.b.transposed) or (m.a.node is node and m.a.transposed)


def _plan(
    steps: tuple[Step, ...], by_node: dict[fx.Node, list[GemmMatch]], config: Config, target: str
) -> HoistPlan:
    top, a2a = steps[0].source, steps[0].node
    readers = _check(steps, by_node)
    rows, tokens = (readers.rows, readers.tokens) if isinstance(readers, _Readers) else ((), ())
    decision: Decision = readers if isinstance(readers, Skip) else Convert()
    top_val = _val(top)
    row_bytes = _row_bytes(top_val, target)
    if decision and row_bytes is None:
        decision = Skip(SkipReason.A2A_SYMBOLIC_ROWS, str(tuple(top_val.shape[1:])))
    if decision and tokens and config.a2a_wgrad == "bf16_a2a":
        decision = Skip(SkipReason.A2A_BF16_FOR_WGRAD, ", ".join(m.site.label for m in tokens))
    site = HoistSite(
        a2a=a2a.name,
        backward=is_backward(a2a),
        crossed=tuple(str(s.node.target).split(".")[-2] for s in steps),
        gemms=tuple(m.site.label for m in rows),
        wgrads=tuple(m.site.label for m in tokens),
        rows=str(top_val.shape[0]),
        row_bytes_before=row_bytes[0] if row_bytes else 0,
        row_bytes_after=row_bytes[1] if row_bytes else 0,
        wgrad_policy=config.a2a_wgrad if tokens else "",
        notes=tuple(_cast_note(s.node) for s in steps if _is_cast(s.node)),
    )
    return HoistPlan(site, decision, top, steps, tokens)


def _row_bytes(val: torch.Tensor, target: str) -> tuple[int, int] | None:
    """Bytes per row (everything but dim 0) as ``val`` has them and as MXFP8 data plus scales:
    one scale byte per 32 elements, or per row of the hidden dim for sm90's rebased rows."""
    shape = tuple(val.shape[1:])
    if not all(isinstance(d, int) for d in shape):
        return None
    elements = math.prod(shape)
    return elements * val.dtype.itemsize, elements + elements // (shape[-1] if target == "sm90" else BLOCK_SIZE)


def _is_cast(node: fx.Node) -> bool:
    return node.target in _IDENTITY and _val(node).dtype != _val(node.args[0]).dtype


def _cast_note(node: fx.Node) -> str:
    src, dst = (str(_val(n).dtype).removeprefix("torch.") for n in (node.args[0], node))
    cast = f"crosses {node.name}, a cast from {src} to {dst}"
    if _val(node.args[0]).dtype.itemsize <= _val(node).dtype.itemsize:
        return f"{cast}: exact (the values are the same)"
    return (f"{cast}: the {src} values are quantized instead of their {dst} rounding (scales and "
            f"rounding can differ slightly)")


def _check(steps: tuple[Step, ...], by_node: dict[fx.Node, list[GemmMatch]]) -> _Readers | Skip:
    """The hoist applies when every reader of the rows between the all-to-all and the GEMMs is
    the next row-moving op, a shape query, a converted GEMM contracting them along their last
    dim, or a wgrad contracting them along tokens (directly or through a transpose)."""
    region = [s.node for s in steps]
    below = {s.source: s.node for s in steps[1:]}
    rows: list[GemmMatch] = []
    tokens: list[GemmMatch] = []
    for node in region:
        for user in node.users:
            if below.get(node) is user or user.target in SHAPE_ONLY:
                continue
            reads = _gemm_reads(user, node, by_node)
            if reads is None:
                return Skip(SkipReason.A2A_NOT_ROW_LOCAL, f"{node.name} is also read by {user.name} ({user.target})")
            rows += [m for m in reads if _reads_rows(m) and m.a.node is node]
            tokens += [m for m in reads if m not in rows]
    return _Readers(tuple(dict.fromkeys(rows)), tuple(dict.fromkeys(tokens)))


def _gemm_reads(user: fx.Node, node: fx.Node, by_node: dict[fx.Node, list[GemmMatch]]) -> list[GemmMatch] | None:
    """The GEMMs through which ``user`` reads ``node`` in a way a hoist can serve, or None."""
    if user.target in _TRANSPOSES and user.users:  # the wgrad's A operand, dy^T
        reads = [m for u in user.users for m in by_node.get(u, []) if m.a.node is user and not m.a.transposed]
        ok = len(reads) == len(user.users) and all(m.site.layout is Layout.GROUPED_2D2D for m in reads)
        return reads if ok else None
    reads = [m for m in by_node.get(user, []) if node in (m.a.node, m.b.node)]
    ok = reads and all((m.decision and _reads_rows(m) and m.a.node is node) or _reads_tokens(m, node) for m in reads)
    return reads if ok else None


# --------------------------------------------------------------------------------------------
# Apply: on the quantize nodes, after the rewrite.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Moved:
    """A tensor's rows in MXFP8 after the hoist: the data as uint8 bytes, and the scales."""

    data: fx.Node
    scales: fx.Node


def apply_hoists(graph: fx.Graph, plans: list[HoistPlan]) -> None:
    """Move the quantization of every planned all-to-all's rows above it."""
    for plan in plans:
        if plan.decision:
            _Hoist(graph, plan).run()


class _Hoist:
    """One planned move: quantize ``top`` as the anchors (the quantize nodes the rewrite put on
    the rows) do, replay every step on the data bytes and on the scales, point the rows' readers
    at the result, and erase the high-precision steps."""

    def __init__(self, graph: fx.Graph, plan: HoistPlan) -> None:
        self.graph, self.plan = graph, plan
        region = [s.node for s in plan.steps]
        anchors = [u for n in region for u in n.users if u.target in _row_quantize_targets()]
        assert anchors, f"no quantize reads the rows of {plan.site.a2a} after the rewrite"
        # the same quantization everywhere: one op and mode per config and target
        self.quantize, self.params = anchors[0].target, anchors[0].args[1:]
        assert all((a.target, a.args[1:]) == (self.quantize, self.params) for a in anchors), anchors
        self.rebased = self.quantize == mxfp8.quantize_rebase.default
        self.provenance = f"hoist_quantize:{plan.site.a2a}"

    def call(self, target: object, *args: object, like: fx.Node, **kwargs: object) -> fx.Node:
        return insert_call(self.graph, target, args, like=like, provenance=self.provenance, kwargs=kwargs)

    def run(self) -> None:
        steps = self.plan.steps
        moved = {self.plan.top: self._quantized(self.plan.top, like=steps[0].node)}
        for step in steps:
            moved[step.node] = self._move(step, moved)
        below = {s.source: s.node for s in steps[1:]}
        for step in steps:
            node = step.node
            for user in list(node.users):
                if below.get(node) is not user:
                    self._reroute(user, node, moved[node])
        for step in reversed(steps):
            assert not step.node.users, (step.node, list(step.node.users))
            side = [a for a in _row_args(step.node) if a is not step.source]
            self.graph.erase_node(step.node)
            for node in side:
                if _is_zero_fill(node) and not node.users:
                    self.graph.erase_node(node)

    def _quantized(self, node: fx.Node, *, like: fx.Node) -> _Moved:
        data, scales = insert_multi(
            self.graph, self.quantize, (node, *self.params), like=like, provenance=self.provenance
        )
        return _Moved(self.call(aten.view.dtype, data, _U8, like=like), scales)

    def _side(self, node: fx.Node, like: fx.Node) -> _Moved:
        """Another row input of a cat or slice_scatter: zeros stay zeros (data 0, scale byte 0,
        what quantizing them gives), the rest is quantized where it is."""
        if not _is_zero_fill(node):
            return self._quantized(node, like=like)
        shape = list(node.args[0])
        scales = shape[:-1] if self.rebased else shape[:-1] + [_val(node).shape[-1] // BLOCK_SIZE]
        kwargs = {**node.kwargs, "dtype": _U8}
        return _Moved(*(self.call(aten.full.default, s, 0, like=like, **kwargs) for s in (shape, scales)))

    def _move(self, step: Step, moved: dict[fx.Node, _Moved]) -> _Moved:
        """What ``step.node`` does to the rows, done to the data bytes and to the scales."""
        node, source = step.node, moved[step.source]
        if node.target in _IDENTITY:
            return source
        if node.target in a2a_targets():
            return _Moved(*send_like(self.graph, node, (source.data, source.scales), self.provenance))
        if node.target in _RESHAPES:
            shape = list(node.args[1])
            last = [] if self.rebased else [_val(source.scales).shape[-1]]
            return _Moved(self.call(node.target, source.data, shape, like=node),
                          self.call(node.target, source.scales, shape[:-1] + last, like=node))
        inputs = {a: moved[a] if a is step.source else self._side(a, node) for a in _row_args(node)}

        def args(part: str) -> Any:  # the op's arguments with its row inputs' data or scales
            return fx.node.map_arg(node.args, lambda a: getattr(inputs[a], part) if a in inputs else a)

        return _Moved(*(self.call(node.target, *args(part), like=node, **node.kwargs) for part in ("data", "scales")))

    def _reroute(self, user: fx.Node, node: fx.Node, rows: _Moved) -> None:
        """Point ``user``, a reader of the hoisted ``node``, at the quantized rows."""
        if user.target in SHAPE_ONLY:  # the data bytes have the rows' shape
            user.replace_input_with(node, rows.data)
        elif user.target in _row_quantize_targets():
            assert user.target == mxfp8.quantize_rebase.default or user.args[1] in (-1, _val(node).dim() - 1), user
            data = self.call(aten.view.dtype, rows.data, _E4M3, like=user)
            for item in list(user.users):
                assert item.target is operator.getitem, item
                item.replace_all_uses_with(data if item.args[1] == 0 else rows.scales)
                self.graph.erase_node(item)
            self.graph.erase_node(user)
        else:  # a wgrad reader, as the plan checked: the dequantized rows
            user.replace_input_with(node, self._dequantized(rows, _val(node).dtype, like=user))

    def _dequantized(self, rows: _Moved, dtype: torch.dtype, *, like: fx.Node) -> fx.Node:
        data = self.call(aten.view.dtype, rows.data, _E4M3, like=like)
        scales = rows.scales
        if self.rebased:  # one scale per row: every block of the row has it
            blocks = _val(data).shape[-1] // BLOCK_SIZE
            scales = self.call(aten.expand.default, self.call(aten.unsqueeze.default, scales, -1, like=like),
                               [-1] * (_val(data).dim() - 1) + [blocks], like=like)
        return self.call(mxfp8.dequantize.default, data, scales, -1, dtype, like=like)


def send_like(graph: fx.Graph, a2a: fx.Node, tensors: tuple[fx.Node, ...], provenance: str) -> list[fx.Node]:
    """Each of ``tensors`` through an all-to-all with the splits and group of ``a2a``, waited
    for; inserted before ``a2a``."""
    def call(target: object, *args: object) -> fx.Node:
        return insert_call(graph, target, args, like=a2a, provenance=provenance)

    return [call(c10d.wait_tensor.default, call(c10d.all_to_all_single.default, t, *a2a.args[1:])) for t in tensors]


# --------------------------------------------------------------------------------------------
# Bytes on the wire, from a graph's shapes and dtypes.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Payload:
    """What one all-to-all in a graph sends: ``rows`` (an expression when symbolic) of
    ``row_bytes`` bytes each, of ``dtype``."""

    node: str
    dtype: torch.dtype
    rows: str
    row_bytes: int

    @property
    def tokens(self) -> bool:
        """Token rows (float data, or uint8 MX bytes), not integer counts."""
        return self.dtype.is_floating_point or self.dtype == _U8


def a2a_payloads(graph: fx.Graph) -> list[Payload]:
    """Every all-to-all of ``graph`` in graph order."""
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in a2a_targets():
            val = _val(node.args[0])
            row_bytes = math.prod(val.shape[1:]) * val.dtype.itemsize
            out.append(Payload(node.name, val.dtype, str(val.shape[0]), int(row_bytes)))
    return out
