"""Rewrite each GEMM the finder converts into quantize -> (rearrange) -> scaled GEMM.

2Dx3D and dense (contraction on A's last dim and B's dim -2)::

    y = _grouped_mm(a, b, offs)         qa, sa = mxfp8.quantize(a, -1, mode)
                                  ->    qbt, sbt = mxfp8.quantize(b^T, -1, mode)
                                        y = mxfp8.scaled_grouped_mm(qa, sa, qbt^T, sbt^T, offs, dtype)

B is quantized through its transpose: in the forward, ``b^T`` is the weight as stored, so the
cast reads contiguous memory, and ``qbt^T`` is column-major, the layout FP8 GEMMs take (a cast
of a transposed view would come out row-major).

2Dx2D (the wgrad contracts over tokens, so both operands are quantized along tokens per group,
each group zero-padded to 32 rows; the padded offsets are computed on the device)::

    dw = _grouped_mm(dy^T, x, offs)     qd, sd, po = mxfp8.quantize_token_groups(dy, offs, mode)
                                  ->    qx, sx, _ = mxfp8.quantize_token_groups(x, offs, mode)
                                        dw = mxfp8.scaled_grouped_mm(qd^T, sd^T, qx, sx, po, dtype)

The emulated target consumes MX scales as they are, so no rearrange node is inserted for it.
The sm90 target rearranges by the rowwise rebase (one power-of-two scale per contraction row, or
per group and row for 2Dx2D), decodes the E8M0 scale bytes to the fp32 torch's rowwise GEMMs
read (``numerics.e8m0_to_fp32``, traced into aten ops that Inductor fuses into one kernel) and
calls the FP8 rowwise GEMMs::

    ra, ra_scale = mxfp8.quantize_rebase(a, mode)        # quantize, then rebase_rowwise, fused
    rbt, rb_scale = mxfp8.quantize_rebase(b^T, mode)
    y = mxfp8.scaled_grouped_mm_rowwise(ra, e8m0_to_fp32(ra_scale), rbt^T, e8m0_to_fp32(rb_scale),
                                        offs, dtype, fast_accum)

and for 2Dx2D, with the rebase per (group, row) and tokens written contiguous by the cast::

    rd, sd, po = mxfp8.quantize_rebase_token_groups(dy, offs, mode)    # (N, Mp)
    rxt, sx, _ = mxfp8.quantize_rebase_token_groups(x, offs, mode)     # (K, Mp)
    dw = mxfp8.scaled_grouped_mm_rowwise(rd, e8m0_to_fp32(sd), rxt^T, e8m0_to_fp32(sx), po, dtype,
                                         fast_accum)

The sm100 target keeps the emulated target's MX operands and rearranges their scales into the
blocked (128x4 tile) layout torch's MX GEMMs read: A's scales of a 2Dx3D GEMM per token group
(each group's scales start at a tile of their own, where torch's kernel looks for them; the GEMM
op pads the groups' rows to 32 unless ``Config.sm100_ragged_groups``), B's per expert, both
2Dx2D operands' per padded token group::

    y = mxfp8.scaled_grouped_mm_blocked(qa, mxfp8.to_blocked_m_groups(sa, offs), qbt^T,
                                        mxfp8.to_blocked(sbt), offs, dtype, ragged_groups)
    qdt, sdt, po = mxfp8.quantize_token_groups_transposed(dy, offs, mode)   # (N, Mp), (N, Mp/32)
    qxt, sxt, _ = mxfp8.quantize_token_groups_transposed(x, offs, mode)     # (K, Mp), (K, Mp/32)
    dw = mxfp8.scaled_grouped_mm_blocked(qdt, mxfp8.to_blocked_k_groups(sdt, po), qxt^T,
                                         mxfp8.to_blocked_k_groups(sxt, po), po, dtype)
    y = mxfp8.scaled_mm_blocked(qa, mxfp8.to_blocked(sa), qbt^T, mxfp8.to_blocked(sbt), dtype)

A dense ``addmm`` keeps its bias as an ``add`` after the GEMM.

With ``Config.weight_blocks="32x32"`` (emulated and sm90), a weight that B reads (a graph
input, through transposes) is cast in 32x32 tiles: once for its forward and its dgrad on the
emulated target; on sm90 once per orientation, both rebased from one grid of tile scales found
before the first (the partitioner saves those few bytes for the backward, not an e4m3 copy of
the weight)::

    qw, tiles = mxfp8.quantize_square(w, mode)                   # w (.., N, K); emulated
    forward: qw, square_scales_along(tiles, -1)                  # along K
    dgrad:   qw^T, square_scales_along(tiles, -2)^T              # the same bytes along N

    tiles = mxfp8.square_tile_scales(w, mode)                    # sm90
    forward: rw, sw = mxfp8.quantize_rebase_square(w, tiles)     # along K
    dgrad:   rwt, swt = mxfp8.quantize_rebase_square(w^T, tiles^T)   # along N

On sm90 and sm100, an activation that a grouped GEMM casts along K and its wgrad along tokens
(the forward's x, the dgrad's dy) is cast once for all of them (``_Casts``); on sm100 in one
kernel that reads it once::

    qa, sa, qxt, sxt, po = mxfp8.quantize_rows_and_token_groups(x, offs, mode)

When that activation is a token permutation (``passes/gathered_rows.py``: ``src[rows]``, times a
routing weight per row in the backward), its casts read ``src`` through ``rows`` and the
permuted tensor is never written::

    ra, sa = mxfp8.quantize_rebase_gathered(src, rows, w, mode)                                # sm90
    rxt, sx, po = mxfp8.quantize_rebase_token_groups_gathered(src, rows, w, offs, mode)
    qa, sa, qxt, sxt, po = mxfp8.quantize_rows_and_token_groups_gathered(src, rows, w, offs, mode)  # sm100
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from mxfp8_compile import numerics
from mxfp8_compile.config import Config
from mxfp8_compile.passes._graph import insert_call, insert_multi, insert_traced
from mxfp8_compile.passes.find_gemms import GemmMatch, Operand
from mxfp8_compile.passes.gathered_rows import Gather, gathered_rows
from mxfp8_compile.passes.report import Layout, Role

mxfp8 = torch.ops.mxfp8
aten = torch.ops.aten


def rewrite_gemms(
    graph: fx.Graph, matches: list[GemmMatch], config: Config, target: str, keep_apart: frozenset[fx.Node] = frozenset()
) -> None:
    """Rewrite every converted match in place, for ``target``. ``keep_apart``: nodes whose casts
    must stay separate ops (the rows a hoist moves: it moves the row cast alone)."""
    casts = _Casts(matches, target, config.scale_mode, keep_apart, square_weights=config.weight_blocks == "32x32",
                   gathered=config.gathered_casts)
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten GEMM's node -> what now computes it
    for match in matches:
        if match.decision:
            # A GEMM may read another's output directly (``fc2(fc1(x))`` on 2D inputs): the
            # match still holds the node that an earlier rewrite erased.
            match = _resolved(match, replaced)
            nodes = _Nodes(graph, match, casts)
            gemm, batch_shape = _as_grouped(match, nodes) if match.site.layout is Layout.BATCHED else (match, None)
            if gemm.pads_contraction:
                gemm = _padded(gemm, nodes)
            out = _EMITTERS[target](gemm, config, nodes)
            if batch_shape is not None:
                out = nodes.call(aten.view.default, out, batch_shape)
            if match.bias is not None:
                out = nodes.call(aten.add.Tensor, out, match.bias)
            replaced[_replace(graph, match, out)] = out


def _as_grouped(m: GemmMatch, n: _Nodes) -> tuple[GemmMatch, list[int] | None]:
    """Batched GEMM ``m`` as the grouped GEMM of its flattened tokens (T per expert: equal
    groups), and the shape to view its forward or dgrad output back to (None for the wgrad,
    whose (E, K, N) output is the grouped wgrad's).

    Forward and dgrad: A (E, T, K) as (E*T, K) against B (E, K, N): 2Dx3D. Wgrad: A = X^T with
    X (E, T, K) and B = dY (E, T, N), as the 2Dx2D GEMM of X (E*T, K) transposed and dY (E*T, N).
    """
    a, b = m.a.node, m.b.node
    with_tokens = b if m.site.role is Role.WGRAD else a  # dim 1 of it
    experts, tokens = a.meta["val"].shape[0], with_tokens.meta["val"].shape[1]
    if isinstance(tokens, torch.SymInt):
        tokens = n.call(aten.sym_size.int, with_tokens, 1)
    # prims.iota, not aten.arange: the joint graph is past decomposition, and Inductor lowers
    # iota but has no lowering for arange (it decomposes it first)
    ends = n.call(torch.ops.prims.iota.default, experts, start=1, step=1, dtype=torch.int32,
                  device=a.meta["val"].device, requires_grad=False)
    offs = n.call(aten.mul.Tensor, ends, tokens)
    if m.site.role is Role.WGRAD:
        x = _token_rows(n, n.transposed(a))
        layout, operands, batch_shape = Layout.GROUPED_2D2D, (Operand(x, True), Operand(_token_rows(n, b))), None
    else:
        n_out = b.meta["val"].shape[-1]
        layout, operands, batch_shape = Layout.GROUPED_2D3D, (Operand(_token_rows(n, a)), m.b), [experts, -1, n_out]
    site = dataclasses.replace(m.site, layout=layout)
    return dataclasses.replace(m, site=site, a=operands[0], b=operands[1], offs=offs, bias=None), batch_shape


def _token_rows(n: _Nodes, x: fx.Node) -> fx.Node:
    """(E, T, D) ``x`` as (E*T, D): a view, after a copy if ``x`` is not contiguous."""
    if not x.meta["val"].is_contiguous():
        x = n.call(aten.clone.default, x, memory_format=torch.contiguous_format)
    return n.call(aten.view.default, x, [-1, x.meta["val"].shape[-1]])


def _padded(m: GemmMatch, n: _Nodes) -> GemmMatch:
    """``m`` with both operands zero-padded along the contraction dim to a multiple of 32: A's
    last dim, B's dim -2 (each the other way round in the node a transposed operand views)."""
    def pad(op: Operand, contraction_dim: int) -> Operand:
        dim = (-3 - contraction_dim) if op.transposed else contraction_dim  # -1 <-> -2
        return dataclasses.replace(op, node=n.call(mxfp8.pad_to_block.default, op.node, dim))

    return dataclasses.replace(m, a=pad(m.a, -1), b=pad(m.b, -2))


def _resolved(m: GemmMatch, replaced: dict[fx.Node, fx.Node]) -> GemmMatch:
    """``m`` with its operands, offsets and bias read from the nodes that replaced them."""
    def get(node: fx.Node | None) -> fx.Node | None:
        return replaced.get(node, node)

    return dataclasses.replace(
        m, a=dataclasses.replace(m.a, node=get(m.a.node)), b=dataclasses.replace(m.b, node=get(m.b.node)),
        offs=get(m.offs), bias=get(m.bias),
    )


# An activation as the casts see it: (node, transposed, offs), the 2D tensor node (or node^T)
# cast within the token groups ending at offs.
CastKey = tuple[fx.Node, bool, fx.Node | None]


def cast_key(node: fx.Node, transposed: bool, offs: fx.Node | None) -> CastKey:
    """The key of 2D ``node`` (or its transpose), through transposes: a wgrad's ``dy^T`` is dy."""
    return *_through_transposes(node, transposed, only_2d=True), offs


def row_cast_key(m: GemmMatch) -> CastKey | None:
    """The key of the A operand that grouped 2Dx3D GEMM ``m`` casts along K (None for other
    GEMMs, and where A is padded first: the padded copy is what is cast)."""
    if m.site.layout is Layout.GROUPED_2D3D and not m.pads_contraction:
        return cast_key(m.a.node, m.a.transposed, m.offs)
    return None


def token_cast_keys(m: GemmMatch) -> tuple[CastKey, ...]:
    """The keys of both operands that 2Dx2D wgrad ``m`` casts along tokens (none for others)."""
    if m.site.layout is not Layout.GROUPED_2D2D:
        return ()
    return cast_key(m.a.node, not m.a.transposed, m.offs), cast_key(m.b.node, m.b.transposed, m.offs)


def shared_cast_keys(converted: list[GemmMatch]) -> set[CastKey]:
    """The activations that sm90 and sm100 cast once for all the GEMMs in ``converted`` that
    read them: cast along K for a grouped GEMM and along tokens for a wgrad (``_Casts``)."""
    rows = {key for m in converted if (key := row_cast_key(m)) is not None}
    return rows & {key for m in converted for key in token_cast_keys(m)}


def shared_gather(key: CastKey) -> Gather | None:
    """The token permutation that shared activation ``key`` is, which its casts read through
    (``Config.gathered_casts``); None for a transposed activation or one no permutation makes."""
    node, transposed, _ = key
    return None if transposed else gathered_rows(node)


def _through_transposes(node: fx.Node, transposed: bool, only_2d: bool = False) -> tuple[fx.Node, bool]:
    """``(source, transposed)``: ``node`` (or its transpose) as the node it transposes the last
    two dims of, through any number of such transposes (of 2D nodes alone if ``only_2d``)."""
    while node.op == "call_function" and (not only_2d or node.meta["val"].dim() == 2) and swaps_last_two(node):
        node, transposed = node.args[0], not transposed
    return node, transposed


# The token-group cast of each target (op names: the ops register on first compile): sm90 and
# sm100 write tokens contiguous, (K, Mp), the layout their wgrad GEMMs read; the emulated
# reference keeps numerics' (Mp, K).
_TOKEN_GROUP_CASTS = {
    "emulated": "quantize_token_groups",
    "sm90": "quantize_rebase_token_groups",
    "sm100": "quantize_token_groups_transposed",
}


class _Casts:
    """The operand casts of one graph's GEMMs for ``target``: MX (emulated, sm100) or rebased
    (sm90), along K (``rows``) or along tokens per group (``token_groups``).

    On sm90 and sm100, an activation cast along K for a grouped GEMM (the forward's x, the dgrad's
    dy) and along tokens for a wgrad with the same offsets is cast once for every GEMM that
    reads it (x feeds the gate and the up projection), before whichever of them comes first: on
    sm100 in one op that reads x once (``quantize_rows_and_token_groups``), on sm90 as the two
    casts (the row cast keeps the template that fuses its producer; a fused rebased pair, which
    reads x twice instead of three times, was slower on an H100 or tied, at every width timed:
    benchmarks/RESULTS.md, 2026-12-06). Such an activation that a token permutation produces is
    cast through it (``gathered``: ``Config.gathered_casts``): on sm90 as the two casts' gathered
    ops, on sm100 as one. The emulated target, the reference, casts every operand where its GEMM
    reads it.
    """

    def __init__(self, matches: list[GemmMatch], target: str, mode: str, keep_apart: frozenset[fx.Node],
                 square_weights: bool = False, gathered: bool = True) -> None:
        self.target, self.rebased, self.mode, self.square_weights = target, target == "sm90", mode, square_weights
        self.gathered = gathered
        self.squares: dict[fx.Node, list[fx.Node]] = {}  # emulated: a weight's (data, tile scales)
        self.tiles: dict[fx.Node, fx.Node] = {}  # sm90: a weight's tile scales
        converted = [m for m in matches if m.decision] if target in ("sm90", "sm100") else []
        self.shared = {key for key in shared_cast_keys(converted) if key[0] not in keep_apart}
        self.outputs: dict[CastKey, list[fx.Node]] = {}

    def rows(self, n: _Nodes, node: fx.Node, transposed: bool, offs: fx.Node | None) -> list[fx.Node]:
        """``(data, scales)`` of 2D or 3D ``node`` (or its transpose) along its last dim."""
        key = cast_key(node, transposed, offs) if offs is not None else None
        if key in self.shared:
            return self._shared(n, key)[:2]
        return self._rows(n, n.transposed(node) if transposed else node)

    def weight(self, n: _Nodes, node: fx.Node, transposed: bool) -> list[fx.Node]:
        """``(data, scales)`` of B's transpose along its last dim, as ``rows``; with square weight
        blocks, a graph input's (a weight's) 32x32 tiles read along K (forward) or along N
        (dgrad): on the emulated target the same bytes transposed, on sm90 each orientation
        cast from the weight's tile scales (``_rebased_square``)."""
        source = _square_source(node, transposed) if self.square_weights else None
        if source is None:
            return self.rows(n, node, transposed, None)
        weight, across = source
        if self.rebased:
            return self._rebased_square(n, weight, across)
        if weight not in self.squares:
            self.squares[weight] = n.multi(mxfp8.quantize_square.default, weight, self.mode)
        data, tiles = self.squares[weight]
        if not across:
            return [data, n.traced(functools.partial(numerics.square_scales_along, dim=-1), tiles)]
        scales = n.traced(functools.partial(numerics.square_scales_along, dim=-2), tiles)
        return [n.transposed(data), n.transposed(scales)]

    def _rebased_square(self, n: _Nodes, weight: fx.Node, across: bool) -> list[fx.Node]:
        """sm90: the rowwise operand of ``weight`` (or of its transpose, ``across``) in 32x32
        tiles, from the weight's tile scales, found once (on the weight as stored, where the
        kernel's loads run along the contiguous dim) for both orientations."""
        if weight not in self.tiles:
            self.tiles[weight] = n.call(mxfp8.square_tile_scales.default, weight, self.mode)
        x, tiles = weight, self.tiles[weight]
        if across:
            x, tiles = n.transposed(x), n.transposed(tiles)
        return n.multi(mxfp8.quantize_rebase_square.default, x, tiles)

    def token_groups(self, n: _Nodes, node: fx.Node, transposed: bool, offs: fx.Node) -> list[fx.Node]:
        """``(data, scales, padded offs)`` of 2D ``node`` (or its transpose) along tokens."""
        key = cast_key(node, transposed, offs)
        if key in self.shared:
            return self._shared(n, key)[2:]
        return self._token_groups(n, n.transposed(node) if transposed else node, offs)

    def _rows(self, n: _Nodes, x: fx.Node) -> list[fx.Node]:
        if self.rebased:
            return n.multi(mxfp8.quantize_rebase.default, x, self.mode)
        return n.multi(mxfp8.quantize.default, x, -1, self.mode)

    def _token_groups(self, n: _Nodes, x: fx.Node, offs: fx.Node) -> list[fx.Node]:
        return n.multi(getattr(mxfp8, _TOKEN_GROUP_CASTS[self.target]).default, x, offs, self.mode)

    def _shared(self, n: _Nodes, key: CastKey) -> list[fx.Node]:
        if key not in self.outputs:
            gather = shared_gather(key) if self.gathered else None
            if gather is not None:
                self.outputs[key] = self._gathered(n, gather, key[2])
            else:
                x = n.transposed(key[0]) if key[1] else key[0]
                self.outputs[key] = ([*self._rows(n, x), *self._token_groups(n, x, key[2])] if self.rebased
                                     else n.multi(mxfp8.quantize_rows_and_token_groups.default, x, key[2], self.mode))
        return self.outputs[key]

    def _gathered(self, n: _Nodes, gather: Gather, offs: fx.Node) -> list[fx.Node]:
        """``_shared``'s casts of a token permutation, read through it, so that the permuted
        tensor is never written: on sm90 as the two casts, on sm100 as one op."""
        weights = None if gather.weights is None else n.call(aten.squeeze.dim, gather.weights, 1)
        args = (gather.src, gather.rows, weights)
        if self.rebased:
            return [*n.multi(mxfp8.quantize_rebase_gathered.default, *args, self.mode),
                    *n.multi(mxfp8.quantize_rebase_token_groups_gathered.default, *args, offs, self.mode)]
        return n.multi(mxfp8.quantize_rows_and_token_groups_gathered.default, *args, offs, self.mode)


def _square_source(node: fx.Node, transposed: bool) -> tuple[fx.Node, bool] | None:
    """``(weight, across)`` where ``node`` (or its transpose) is graph input ``weight`` (.., R, C),
    possibly through transposes of its last two dims, read along its last dim (``across``
    False) or along dim -2 (True); None for a computed node or one that 32x32 tiles do not fit
    (its last two dims static multiples of 32)."""
    node, transposed = _through_transposes(node, transposed)
    if node.op != "placeholder":
        return None
    if not all(isinstance(d, int) and d % numerics.BLOCK_SIZE == 0 for d in node.meta["val"].shape[-2:]):
        return None
    return node, transposed


def swaps_last_two(node: fx.Node) -> bool:
    """Whether ``node`` is a transpose of its input's last two dims (and moves nothing else)."""
    rank = node.meta["val"].dim()
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return {d % rank for d in node.args[1:3]} == {rank - 2, rank - 1}
    if node.target is aten.permute.default:
        return list(node.args[1]) == [*range(rank - 2), rank - 1, rank - 2]
    return False


class _Nodes:
    """Builds the nodes that replace one GEMM: each inserted before it, with its metadata."""

    def __init__(self, graph: fx.Graph, m: GemmMatch, casts: _Casts) -> None:
        self.graph, self.gemm, self.provenance = graph, m.node, f"rewrite_gemms:{m.site.label}"
        self.casts = casts

    def call(self, target: object, *args: object, **kwargs: object) -> fx.Node:
        return insert_call(self.graph, target, args, like=self.gemm, provenance=self.provenance, kwargs=kwargs)

    def multi(self, target: object, *args: object) -> list[fx.Node]:
        return insert_multi(self.graph, target, args, like=self.gemm, provenance=self.provenance)

    def traced(self, fn: Callable[..., torch.Tensor], *args: fx.Node) -> fx.Node:
        return insert_traced(self.graph, fn, args, like=self.gemm, provenance=self.provenance)

    def transposed(self, node: fx.Node) -> fx.Node:
        return self.call(aten.permute.default, node, [1, 0] if node.meta["val"].dim() == 2 else [0, 2, 1])


def _cast_operands(m: GemmMatch, n: _Nodes) -> tuple[fx.Node, ...]:
    """The operands as the target's casts return them (MX, or rebased on sm90).

    2Dx2D: ``(qa, sa, qb, sb, padded_offs)``, A's (M, N) token-major transpose and B (M, K) along
    tokens per group: (Mp, N) and (Mp, K) for the emulated target; sm90 and sm100 cast them
    written transposed, tokens contiguous: A (N, Mp), B^T (K, Mp), and their scales likewise.
    2Dx3D and dense: ``(qa, sa, qbt, sbt, offs)``, A and B's transpose along K.
    """
    if m.site.layout is Layout.GROUPED_2D2D:
        qa, sa, padded_offs = n.casts.token_groups(n, m.a.node, not m.a.transposed, m.offs)
        qb, sb, _ = n.casts.token_groups(n, m.b.node, m.b.transposed, m.offs)
        return qa, sa, qb, sb, padded_offs
    qa, sa = n.casts.rows(n, m.a.node, m.a.transposed, m.offs)
    qbt, sbt = n.casts.weight(n, m.b.node, not m.b.transposed)
    return qa, sa, qbt, sbt, m.offs


def _emit_emulated(m: GemmMatch, config: Config, n: _Nodes) -> fx.Node:
    """MX operands with their scales as they are (no rearrange), the emulated GEMMs."""
    qa, sa, qb, sb, offs = _cast_operands(m, n)
    if m.site.layout is Layout.GROUPED_2D2D:  # A back to (N, Mp)
        return n.call(mxfp8.scaled_grouped_mm.default, n.transposed(qa), n.transposed(sa), qb, sb, offs, m.out_dtype)
    b = (n.transposed(qb), n.transposed(sb))  # B^T quantized, viewed back as B
    if m.site.layout is Layout.DENSE:
        return n.call(mxfp8.scaled_mm.default, qa, sa, *b, m.out_dtype)
    return n.call(mxfp8.scaled_grouped_mm.default, qa, sa, *b, offs, m.out_dtype)


def _rebased_operands(m: GemmMatch, n: _Nodes) -> tuple[fx.Node, ...]:
    """The sm90 target's operands (``_cast_operands``), their scales decoded to fp32."""
    qa, sa, qbt, sb, offs = _cast_operands(m, n)
    return qa, n.traced(numerics.e8m0_to_fp32, sa), qbt, n.traced(numerics.e8m0_to_fp32, sb), offs


def _emit_sm90(m: GemmMatch, config: Config, n: _Nodes) -> fx.Node:
    """The rebased operands, then the FP8 rowwise GEMMs."""
    qa, sa, qbt, sb, offs = _rebased_operands(m, n)
    fast_accum = m.site.role.value in config.fast_accum
    if m.site.layout is Layout.DENSE:
        return n.call(mxfp8.scaled_mm_rowwise.default, qa, sa, n.transposed(qbt), sb, m.out_dtype, fast_accum)
    return n.call(mxfp8.scaled_grouped_mm_rowwise.default, qa, sa, n.transposed(qbt), sb, offs, m.out_dtype,
                  fast_accum)


def _emit_sm100(m: GemmMatch, config: Config, n: _Nodes) -> fx.Node:
    """The emulated target's MX operands, their scales rearranged into the blocked layouts
    torch's MX GEMMs read, then the blocked-scale GEMM."""
    qa, sa, qb, sb, offs = _cast_operands(m, n)
    if m.site.layout is Layout.GROUPED_2D2D:
        # Both operands along tokens, padded per group, written tokens contiguous: A (N, Mp) is
        # row-major and B = qb^T (Mp, K) column-major as cast, so no copy precedes the GEMM;
        # each group's scale columns blocked alone.
        sa_blocked = n.call(mxfp8.to_blocked_k_groups.default, sa, offs)
        sb_blocked = n.call(mxfp8.to_blocked_k_groups.default, sb, offs)
        return n.call(mxfp8.scaled_grouped_mm_blocked.default, qa, sa_blocked, n.transposed(qb), sb_blocked, offs,
                      m.out_dtype)
    sb_blocked = n.call(mxfp8.to_blocked.default, sb)  # B^T's scales (.., N, K/32): per expert for 3D B
    if m.site.layout is Layout.DENSE:
        sa_blocked = n.call(mxfp8.to_blocked.default, sa)
        return n.call(mxfp8.scaled_mm_blocked.default, qa, sa_blocked, n.transposed(qb), sb_blocked, m.out_dtype)
    # Each token group's A scales are blocked from a 128-row tile of its own; the GEMM pads the
    # groups' rows to 32 unless Config.sm100_ragged_groups.
    sa_blocked = n.call(mxfp8.to_blocked_m_groups.default, sa, offs)
    return n.call(mxfp8.scaled_grouped_mm_blocked.default, qa, sa_blocked, n.transposed(qb), sb_blocked, offs,
                  m.out_dtype, config.sm100_ragged_groups)


_EMITTERS: dict[str, Callable[[GemmMatch, Config, _Nodes], fx.Node]] = {
    "emulated": _emit_emulated, "sm90": _emit_sm90, "sm100": _emit_sm100,
}


def _replace(graph: fx.Graph, m: GemmMatch, new: fx.Node) -> fx.Node:
    """Route the GEMM's users (or, for one output of a multi-output node, that getitem's) to
    ``new``, and erase what is left unused; return the node replaced."""
    if m.output is None:
        old = m.node
    else:
        (old,) = [u for u in m.node.users if u.target is operator.getitem and u.args[1] == m.output]
    old_val, new_val = old.meta["val"], new.meta["val"]
    assert old_val.shape == new_val.shape and old_val.dtype == new_val.dtype, (old_val, new_val)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    if m.output is not None and not m.node.users:
        graph.erase_node(m.node)
    return old
