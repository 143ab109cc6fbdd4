"""Find every GEMM in an aten graph, say which GEMM of its layer it is, and decide whether to
convert it.

Anchored on the GEMM node alone (pattern nodes with other users would block matches):

* ``aten._grouped_mm(A, B, offs)``: 2Dx3D is the forward (or, in the backward, the dgrad),
  2Dx2D the wgrad; 3Dx3D and 3Dx2D have no MX path. B may have any strides: ``W.transpose(-2,
  -1)`` (strides (N*K, 1, K)), contiguous (E, K, N) as GPT-OSS passes it, or W in the dgrad.
* ``aten.mm`` / ``aten.addmm``: dense linears; backward nodes are the dgrad when an operand views
  the weight of a forward GEMM, else the wgrad.
* ``transformers::grouped_mm_fallback(input, weight (E, K, N), offs)`` and its backward, which
  HF transformers 5.x emits under compile for non-bf16 expert weights; the backward holds the
  dgrad (output 0) and the wgrad (output 1).

Every GEMM becomes a ``GemmMatch``: its report record (``GemmSite``), the operands in the
canonical form the rewrite takes (A (.., K) contracted on its last dim, B (.., K, N) on dim -2,
each possibly as the transpose of a node), and a decision.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Mapping

import torch
import torch.fx as fx

from mxfp8_compile.config import Config
from mxfp8_compile.numerics import BLOCK_SIZE
from mxfp8_compile.passes._graph import (
    FRAME,
    UNKNOWN_PARENT,
    VIEW_OPS,
    is_backward,
    known_multiple,
    module_fqn,
    view_source,
)
from mxfp8_compile.passes.module_roles import module_roles
from mxfp8_compile.passes.report import Convert, Decision, GemmSite, Layout, Role, Skip, SkipReason

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Operand:
    """A GEMM operand: ``node``, or its transpose (last two dims) when ``transposed``."""

    node: fx.Node
    transposed: bool = False

    @property
    def shape(self) -> tuple[int | torch.SymInt, ...]:
        shape = tuple(self.node.meta["val"].shape)
        return shape[:-2] + shape[-2:][::-1] if self.transposed else shape

    @property
    def dtype(self) -> torch.dtype:
        return self.node.meta["val"].dtype


@dataclasses.dataclass(frozen=True)
class GemmMatch:
    site: GemmSite
    decision: Decision
    node: fx.Node
    a: Operand
    b: Operand
    offs: fx.Node | None
    bias: fx.Node | None
    out_dtype: torch.dtype
    output: int | None = None  # which output of a multi-output node this GEMM produces

    @property
    def pads_contraction(self) -> bool:
        """Whether the contraction dim must be zero-padded to a multiple of 32 (it is not one, or
        not known to be one). Wgrads contract over token groups, which their cast pads per group."""
        return _pads_contraction(self.site.layout, self.site.role, self.a.shape[-1])


def _pads_contraction(layout: Layout, role: Role, contraction: int | torch.SymInt) -> bool:
    over_token_groups = layout is Layout.GROUPED_2D2D or (layout is Layout.BATCHED and role is Role.WGRAD)
    return not over_token_groups and not known_multiple(contraction, BLOCK_SIZE)


def _hf_ops() -> tuple[object | None, object | None]:
    """HF transformers' fallback ops, if transformers registered them in this process."""
    ns = getattr(torch.ops, "transformers", None)
    if ns is None:
        return None, None
    fwd = getattr(ns, "grouped_mm_fallback", None)
    bwd = getattr(ns, "grouped_mm_fallback_backward", None)
    return (fwd.default if fwd else None), (bwd.default if bwd else None)


def find_gemms(graph: fx.Graph, config: Config) -> list[GemmMatch]:
    """All GEMMs of ``graph`` in graph order, each with its decision."""
    hf_fwd, hf_bwd = _hf_ops()
    dense = (aten.mm.default, aten.addmm.default)
    gemms = [n for n in graph.nodes if n.op == "call_function"
             and (n.target in dense or n.target in BATCHED or n.target in (aten._grouped_mm.default, hf_fwd, hf_bwd))]
    weight_sources = {view_source(_operands(n)[1]) for n in gemms if n.target in dense and not is_backward(n)}
    batched_weights = {w for n in gemms if n.target in BATCHED and not is_backward(n) for operand in _operands(n)[:2]
                       if (w := _weight_source(operand)[0]) is not None}
    roles = module_roles([n for n in gemms if not is_backward(n)], set(gemms), config.keep_bf16_roles)
    matches: list[GemmMatch] = []
    for node in gemms:
        if node.target == aten._grouped_mm.default:
            matches.append(_grouped(node, config, roles))
        elif node.target in dense:
            matches.append(_dense(node, config, roles, weight_sources))
        elif node.target in BATCHED:
            matches.append(_batched(node, config, roles, batched_weights))
        elif node.target == hf_fwd:
            input_, weight, offs = node.args[:3]
            matches.append(
                _match(node, config, roles, Role.FORWARD, Layout.GROUPED_2D3D, Operand(input_), Operand(weight), offs)
            )
        else:
            input_, weight, offs, grad = node.args[:4]
            # An output nobody reads (a frozen weight, an input without grad) has no getitem
            # left in the graph, and no GEMM to convert.
            used = {u.args[1] for u in node.users if u.target is operator.getitem}
            if 0 in used:
                matches.append(_match(node, config, roles, Role.DGRAD, Layout.GROUPED_2D3D, Operand(grad),
                                      Operand(weight, True), offs, output=0))
            if 1 in used:
                matches.append(_match(node, config, roles, Role.WGRAD, Layout.GROUPED_2D2D, Operand(input_, True),
                                      Operand(grad), offs, output=1))
    _warn_where_paths_cannot_decide(matches, config)
    return matches


def apply_target_rules(matches: list[GemmMatch], target: str) -> list[GemmMatch]:
    """``matches`` with every converted GEMM that breaks a shape rule of ``target``'s kernels
    (``targets.broken_rule``) kept in high precision, the rule named in its reason: torch would
    raise at run time, on the GPU, what fake tensors let through at compile time."""
    from mxfp8_compile.lowering.targets import broken_rule

    def checked(m: GemmMatch) -> GemmMatch:
        groups = m.offs.meta["val"].shape[0] if m.offs is not None else None
        rule = broken_rule(target, m.b.shape, groups) if m.decision else None
        return dataclasses.replace(m, decision=Skip(SkipReason.TARGET_RULE, rule)) if rule else m

    return [checked(m) for m in matches]


def _grouped(node: fx.Node, config: Config, roles: Mapping[str, str]) -> GemmMatch:
    a, b = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    out_dtype = node.args[4] if len(node.args) > 4 else node.kwargs.get("out_dtype")
    a_dim, b_dim = a.meta["val"].dim(), b.meta["val"].dim()
    layout = {
        (2, 3): Layout.GROUPED_2D3D,
        (2, 2): Layout.GROUPED_2D2D,
        (3, 3): Layout.GROUPED_3D3D,
        (3, 2): Layout.GROUPED_3D2D,
    }[(a_dim, b_dim)]
    if layout is Layout.GROUPED_2D2D:
        role = Role.WGRAD
    else:
        role = Role.DGRAD if is_backward(node) else Role.FORWARD
    extra = None
    if bias is not None:
        extra = Skip(SkipReason.UNSUPPORTED_ARGS, "grouped_mm with a bias")
    return _match(node, config, roles, role, layout, Operand(a), Operand(b), offs, out_dtype=out_dtype, extra=extra)


BATCHED = (aten.bmm.default, aten.baddbmm.default)
# What a weight may pass through on its way into a batched GEMM: views and dtype casts (the
# gathers are told apart: per-token weights).
_CASTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)
_GATHERS = (aten.index.Tensor, aten.index_select.default, aten.embedding.default)


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """``(A, B, bias)`` of ``mm``/``bmm(A, B)`` or ``addmm``/``baddbmm(bias, A, B)``."""
    if node.target in (aten.addmm.default, aten.baddbmm.default):
        bias, a, b = node.args[:3]
        return a, b, bias
    a, b = node.args[:2]
    return a, b, None


def _scaled_sum(node: fx.Node) -> Skip | None:
    """The skip for ``addmm``/``baddbmm`` with ``beta`` or ``alpha`` other than 1 (the MX path
    adds the bias as is)."""
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if beta == 1 and alpha == 1:
        return None
    return Skip(SkipReason.UNSUPPORTED_ARGS, f"{node.target.__name__.split('.')[0]} with beta={beta}, alpha={alpha}")


def _weight_source(node: fx.Node) -> tuple[fx.Node | None, bool]:
    """The graph input ``node`` views, casts or gathers (a parameter, in a module's graph) and
    whether a gather is on the way (per-token weights); ``(None, False)`` for a computed node."""
    gathered = False
    while node.op == "call_function" and (node.target in VIEW_OPS or node.target in _CASTS or node.target in _GATHERS):
        gathered |= node.target in _GATHERS
        node = node.args[0]
    return (node, gathered) if node.op == "placeholder" else (None, False)


def _feeds_an_output(node: fx.Node) -> bool:
    """Whether ``node``, through views and casts alone, is one of the graph's outputs (a
    weight's gradient, in a joint graph)."""
    frontier = [node]
    while frontier:
        for user in frontier.pop().users:
            if user.op == "output":
                return True
            if user.target in VIEW_OPS or user.target in _CASTS:
                frontier.append(user)
    return False


def _batched(node: fx.Node, config: Config, roles: Mapping[str, str], weights: set[fx.Node]) -> GemmMatch:
    """``bmm``/``baddbmm``: experts applied as a batch (HF Llama4's ``(E, T, K) x (E, K, N)``).
    The forward reads a weight as B; the dgrad reads one of the forward's weights; the wgrad
    reads none and is a gradient output; anything else multiplies two activations. Weights
    gathered per token (HF's ``batched_mm``, as A or as B) stay bf16 in the forward and the dgrad."""
    a, b, bias = _operands(node)
    (a_weight, a_gathered), (b_weight, b_gathered) = _weight_source(a), _weight_source(b)
    extra = None
    if a_gathered or b_gathered:
        role = Role.DGRAD if is_backward(node) else Role.FORWARD
        which, weight = ("A", a_weight) if a_gathered else ("B", b_weight)
        extra = Skip(SkipReason.GATHERED_WEIGHTS, f"{which} is gathered from {weight.name} per token")
    elif not is_backward(node) or a_weight in weights or b_weight in weights:
        role = Role.DGRAD if is_backward(node) else Role.FORWARD
        if b_weight is None and a_weight is None:
            extra = Skip(SkipReason.BATCHED_ACTIVATIONS, "neither operand is a weight")
        elif b_weight is None:  # bmm(W, x): the MX path takes the weight as B
            extra = Skip(SkipReason.UNSUPPORTED_LAYOUT, f"the weight {a_weight.name} is A, not B")
    else:
        role = Role.WGRAD
        if not _feeds_an_output(node):
            extra = Skip(SkipReason.BATCHED_ACTIVATIONS, "its result is not a weight's gradient")
    extra = extra if extra is not None else _scaled_sum(node)
    return _match(node, config, roles, role, Layout.BATCHED, Operand(a), Operand(b), None, bias=bias, extra=extra)


def _dense(node: fx.Node, config: Config, roles: Mapping[str, str], weight_sources: set[object]) -> GemmMatch:
    a, b, bias = _operands(node)
    extra = _scaled_sum(node)
    if not is_backward(node):
        role = Role.FORWARD
    elif view_source(a) in weight_sources or view_source(b) in weight_sources:
        role = Role.DGRAD
    else:
        role = Role.WGRAD
    return _match(node, config, roles, role, Layout.DENSE, Operand(a), Operand(b), None, bias=bias, extra=extra)


def _match(
    node: fx.Node,
    config: Config,
    roles: Mapping[str, str],
    role: Role,
    layout: Layout,
    a: Operand,
    b: Operand,
    offs: fx.Node | None,
    *,
    bias: fx.Node | None = None,
    out_dtype: torch.dtype | None = None,
    output: int | None = None,
    extra: Skip | None = None,
) -> GemmMatch:
    fqn = module_fqn(node)
    contraction = a.shape[-1]
    site = GemmSite(
        node=node.name,
        op=str(node.target),
        role=role,
        layout=layout,
        shapes=(tuple(map(str, a.shape)), tuple(map(str, b.shape))),
        dtype=str(a.dtype).removeprefix("torch."),
        fqn=fqn,
        contraction=str(contraction),
        output=output,
        **_operand_bytes(a, b, layout, offs),
    )
    module_role = roles.get(fqn or node.name)
    # (a Skip is falsy: test for None)
    decision = extra if extra is not None else _decide(config, role, layout, fqn, module_role, a, b, offs)
    return GemmMatch(site, decision, node, a, b, offs, bias, out_dtype or a.dtype, output)


def _operand_bytes(a: Operand, b: Operand, layout: Layout, offs: fx.Node | None) -> dict[str, int | None]:
    """Bytes both operands occupy now, and as MXFP8 data plus scales (static shapes only)."""
    numels = [math.prod(op.shape) for op in (a, b)]
    if not all(isinstance(n, int) for n in numels):
        return {"bytes_before": None, "bytes_after": None}
    before = sum(n * op.dtype.itemsize for n, op in zip(numels, (a, b)))
    if layout is Layout.GROUPED_2D2D and offs is not None:
        # each token group is padded to 32 rows: at most 31 more token rows per group, each as
        # wide as the operand's other dim (A is (N, tokens), B is (tokens, K))
        groups = offs.meta["val"].shape[0]
        numels = [n + (BLOCK_SIZE - 1) * groups * width for n, width in zip(numels, (a.shape[0], b.shape[-1]))]
    after = sum(n + n // BLOCK_SIZE for n in numels)
    return {"bytes_before": before, "bytes_after": after}


def _path_rule(config: Config, fqn: str) -> Skip | None:
    """``Config.exclude_fqns`` and ``include_fqns`` applied to a module path."""
    if hit := [s for s in config.exclude_fqns if s in fqn]:
        return Skip(SkipReason.FQN_EXCLUDED, f"{fqn!r} contains {hit[0]!r}")
    if config.include_fqns and not any(s in fqn for s in config.include_fqns):
        return Skip(SkipReason.FQN_NOT_INCLUDED, f"{fqn!r} not in {config.include_fqns}")
    return None


def _warn_where_paths_cannot_decide(matches: list[GemmMatch], config: Config) -> None:
    """Warn when include/exclude rules met module paths they cannot decide by: paths whose
    frame's place in the model is unknown, or a frame that Dynamo may run for other modules
    (``FramePlace.alike``) which the rules would treat differently."""
    if not (config.include_fqns or config.exclude_fqns):
        return
    unknown = sorted({m.site.fqn for m in matches if m.site.fqn.split(".")[0] == UNKNOWN_PARENT})
    if unknown:
        warnings.warn(
            f"mxfp8_compile: Config.include_fqns/exclude_fqns matched paths relative to a compiled frame whose place "
            f"in the model is unknown ({', '.join(unknown[:3])}): the rules may not apply to those GEMMs as meant",
            stacklevel=2,
        )
    place = FRAME.get()
    differ = set()
    for m in matches:
        if not place.path or not m.site.fqn.startswith(place.path):
            continue
        converts = _path_rule(config, m.site.fqn) is None
        for alike in place.alike:
            twin = alike + m.site.fqn[len(place.path):]
            if (_path_rule(config, twin) is None) != converts:
                differ.add(twin)
    differ = sorted(differ)
    if differ:
        warnings.warn(
            f"mxfp8_compile: one compiled frame serves {place.path} and the other modules of its class, and "
            f"Config.include_fqns/exclude_fqns decide {len(differ)} of their GEMMs otherwise (e.g. {differ[0]}); "
            f"all get {place.path}'s decisions. Dynamo compiled the frame alone after a graph break: rules that name "
            "a whole family of modules (e.g. 'experts'), or no graph break, avoid this",
            stacklevel=2,
        )


def _decide(
    config: Config,
    role: Role,
    layout: Layout,
    fqn: str,
    module_role: str | None,
    a: Operand,
    b: Operand,
    offs: fx.Node | None,
) -> Decision:
    """Convert, or the first reason not to; checks run from the structural to the tunable.
    ``module_role`` is the evidence that the GEMM's module is a router or an output head."""
    if layout in (Layout.GROUPED_3D3D, Layout.GROUPED_3D2D):
        return Skip(SkipReason.UNSUPPORTED_LAYOUT, f"{layout.value} grouped_mm (batched)")
    if layout not in (Layout.DENSE, Layout.BATCHED):
        if offs is None:
            return Skip(SkipReason.UNSUPPORTED_ARGS, "grouped_mm without offs")
        if offs.meta["val"].dtype != torch.int32:
            return Skip(SkipReason.UNSUPPORTED_ARGS, f"offs of dtype {offs.meta['val'].dtype}, not int32")
    if layout is Layout.DENSE and not config.dense_linears:
        return Skip(SkipReason.DENSE_DISABLED)
    if role.value not in config.gemms:
        return Skip(SkipReason.ROLE_DISABLED, f"{role.value} not in {config.gemms}")
    if module_role:
        return Skip(SkipReason.KEEP_BF16, module_role)
    if kept := [m for m in config.keep_bf16_modules if m in fqn.split(".")]:
        return Skip(SkipReason.KEEP_BF16, f"{fqn} has component {kept[0]!r} (Config.keep_bf16_modules)")
    if (by_path := _path_rule(config, fqn)) is not None:
        return by_path
    for name, operand in (("A", a), ("B", b)):
        if not config.allows_dtype(operand.dtype):
            return Skip(SkipReason.DTYPE, f"{name} is {operand.dtype}; allowed: {config.operand_dtypes}")
    # The weight is (K, N) for the forward, (N, K) for the dgrad and the wgrad's output (N, K).
    weight_elements = (a.shape[-2] if role is Role.WGRAD else a.shape[-1]) * b.shape[-1]
    if isinstance(weight_elements, int) and weight_elements < config.min_gemm_size:
        return Skip(SkipReason.TOO_SMALL, f"{weight_elements} < {config.min_gemm_size}")
    # 2Dx2D contracts over token groups, each padded to 32 by the quantization itself; any other
    # contraction that is not a multiple of 32 (or not known to be one) is zero-padded.
    contraction = a.shape[-1]
    if _pads_contraction(layout, role, contraction):
        known = "unknown at compile time" if isinstance(contraction, torch.SymInt) else "not a multiple of 32"
        return Convert(f"contraction {contraction} ({known}) zero-padded to a multiple of 32")
    return Convert()
