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
per group and row for 2Dx2D) and calls the FP8 rowwise GEMMs::

    ra, ra_scale = mxfp8.quantize_rebase(a, mode)        # quantize, then rebase_rowwise, fused
    rbt, rb_scale = mxfp8.quantize_rebase(b^T, mode)
    y = mxfp8.scaled_grouped_mm_rowwise(ra, ra_scale, rbt^T, rb_scale, offs, dtype, fast_accum)

and for 2Dx2D, with the rebase per (group, row) and tokens written contiguous by the cast::

    rd, sd, po = mxfp8.quantize_rebase_token_groups(dy, offs, mode)    # (N, Mp)
    rxt, sx, _ = mxfp8.quantize_rebase_token_groups(x, offs, mode)     # (K, Mp)
    dw = mxfp8.scaled_grouped_mm_rowwise(rd, sd, rxt^T, sx, po, dtype, fast_accum)

The sm100 target keeps the emulated target's MX operands and rearranges their scales into the
blocked (128x4 tile) layout torch's MX GEMMs read: A's scales of a 2Dx3D GEMM per token group
(ragged groups need no token padding: each group's scales start at a tile of their own, where
torch's kernel looks for them), B's per expert, both 2Dx2D operands' per padded token group::

    y = mxfp8.scaled_grouped_mm_blocked(qa, mxfp8.to_blocked_m_groups(sa, offs), qbt^T,
                                        mxfp8.to_blocked(sbt), offs, dtype)
    dw = mxfp8.scaled_grouped_mm_blocked(qd^T, mxfp8.to_blocked_k_groups(sd^T, po), qx,
                                         mxfp8.to_blocked_k_groups(sx^T, po), po, dtype)
    y = mxfp8.scaled_mm_blocked(qa, mxfp8.to_blocked(sa), qbt^T, mxfp8.to_blocked(sbt), dtype)

A dense ``addmm`` keeps its bias as an ``add`` after the GEMM.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx

from mxfp8_compile.config import Config
from mxfp8_compile.passes._graph import insert_call, insert_multi
from mxfp8_compile.passes.find_gemms import GemmMatch, Operand
from mxfp8_compile.passes.report import Layout

mxfp8 = torch.ops.mxfp8
aten = torch.ops.aten


def rewrite_gemms(graph: fx.Graph, matches: list[GemmMatch], config: Config, target: str) -> None:
    """Rewrite every converted match in place, for ``target``."""
    for match in matches:
        if match.decision:
            _replace(graph, match, _emit(graph, match, config, target))


def _emit(graph: fx.Graph, m: GemmMatch, config: Config, target: str) -> fx.Node:
    provenance = f"rewrite_gemms:{m.site.label}"

    def call(target: object, *args: object) -> fx.Node:
        return insert_call(graph, target, args, like=m.node, provenance=provenance)

    def multi(target: object, *args: object) -> list[fx.Node]:
        return insert_multi(graph, target, args, like=m.node, provenance=provenance)

    def transposed(node: fx.Node) -> fx.Node:
        return call(aten.permute.default, node, [1, 0] if node.meta["val"].dim() == 2 else [0, 2, 1])

    def materialize(op: Operand) -> fx.Node:
        return transposed(op.node) if op.transposed else op.node

    def transpose_of(op: Operand) -> fx.Node:
        return op.node if op.transposed else transposed(op.node)

    def with_bias(out: fx.Node) -> fx.Node:
        return out if m.bias is None else call(aten.add.Tensor, out, m.bias)

    mode, sm90 = config.scale_mode, target == "sm90"
    if target == "sm100":
        return with_bias(_emit_sm100(m, mode, _Builders(call, multi, transposed, materialize, transpose_of)))
    if m.site.layout is Layout.GROUPED_2D2D:
        # A is (N, M): quantize its token-major transpose (M, N), then view the result back.
        if sm90:  # one kernel per operand writes it rebased with tokens contiguous: (N, Mp), (K, Mp)
            qa, sa, padded_offs = multi(mxfp8.quantize_rebase_token_groups.default, transpose_of(m.a), m.offs, mode)
            qbt, sb, _ = multi(mxfp8.quantize_rebase_token_groups.default, materialize(m.b), m.offs, mode)
            return call(mxfp8.scaled_grouped_mm_rowwise.default, qa, sa, transposed(qbt), sb, padded_offs,
                        m.out_dtype, config.fast_accum)
        qa, sa, padded_offs = multi(mxfp8.quantize_token_groups.default, transpose_of(m.a), m.offs, mode)
        qb, sb, _ = multi(mxfp8.quantize_token_groups.default, materialize(m.b), m.offs, mode)
        return call(
            mxfp8.scaled_grouped_mm.default, transposed(qa), transposed(sa), qb, sb, padded_offs, m.out_dtype
        )
    b_t = transpose_of(m.b)
    dense = m.site.layout is Layout.DENSE
    if sm90:  # quantize and rebase in one kernel per operand
        qa, sa = multi(mxfp8.quantize_rebase.default, materialize(m.a), mode)
        qbt, sb = multi(mxfp8.quantize_rebase.default, b_t, mode)
        gemm = mxfp8.scaled_mm_rowwise.default if dense else mxfp8.scaled_grouped_mm_rowwise.default
        args = (m.out_dtype, config.fast_accum) if dense else (m.offs, m.out_dtype, config.fast_accum)
        return with_bias(call(gemm, qa, sa, transposed(qbt), sb, *args))
    qa, sa = multi(mxfp8.quantize.default, materialize(m.a), -1, mode)
    qbt, sbt = multi(mxfp8.quantize.default, b_t, -1, mode)
    if dense:
        out = call(mxfp8.scaled_mm.default, qa, sa, transposed(qbt), transposed(sbt), m.out_dtype)
    else:
        out = call(mxfp8.scaled_grouped_mm.default, qa, sa, transposed(qbt), transposed(sbt), m.offs, m.out_dtype)
    return with_bias(out)


class _Builders(NamedTuple):
    """``_emit``'s node builders for one GEMM, handed to the emitter of a single target."""

    call: Callable[..., fx.Node]
    multi: Callable[..., list[fx.Node]]
    transposed: Callable[[fx.Node], fx.Node]
    materialize: Callable[[Operand], fx.Node]
    transpose_of: Callable[[Operand], fx.Node]


def _emit_sm100(m: GemmMatch, mode: str, b: _Builders) -> fx.Node:
    """The sm100 rewrite of one GEMM (its bias not added): the emulated target's MX operands,
    their scales rearranged into the blocked layouts torch's MX GEMMs read, then the
    blocked-scale GEMM."""
    if m.site.layout is Layout.GROUPED_2D2D:
        # Both operands along tokens, padded per group; each group's scale columns blocked alone.
        qa, sa, padded_offs = b.multi(mxfp8.quantize_token_groups.default, b.transpose_of(m.a), m.offs, mode)
        qb, sb, _ = b.multi(mxfp8.quantize_token_groups.default, b.materialize(m.b), m.offs, mode)
        sa_blocked = b.call(mxfp8.to_blocked_k_groups.default, b.transposed(sa), padded_offs)
        sb_blocked = b.call(mxfp8.to_blocked_k_groups.default, b.transposed(sb), padded_offs)
        return b.call(
            mxfp8.scaled_grouped_mm_blocked.default, b.transposed(qa), sa_blocked, qb, sb_blocked, padded_offs,
            m.out_dtype,
        )
    qa, sa = b.multi(mxfp8.quantize.default, b.materialize(m.a), -1, mode)
    qbt, sbt = b.multi(mxfp8.quantize.default, b.transpose_of(m.b), -1, mode)
    sb_blocked = b.call(mxfp8.to_blocked.default, sbt)  # (.., N, K/32): per expert for 3D B
    if m.site.layout is Layout.DENSE:
        sa_blocked = b.call(mxfp8.to_blocked.default, sa)
        return b.call(mxfp8.scaled_mm_blocked.default, qa, sa_blocked, b.transposed(qbt), sb_blocked, m.out_dtype)
    # Token groups stay ragged: each group's A scales are blocked from a 128-row tile of its own.
    sa_blocked = b.call(mxfp8.to_blocked_m_groups.default, sa, m.offs)
    return b.call(
        mxfp8.scaled_grouped_mm_blocked.default, qa, sa_blocked, b.transposed(qbt), sb_blocked, m.offs, m.out_dtype
    )


def _replace(graph: fx.Graph, m: GemmMatch, new: fx.Node) -> None:
    """Route the GEMM's users (or, for one output of a multi-output node, that getitem's) to
    ``new``, and erase what is left unused."""
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
