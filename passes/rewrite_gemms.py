"""Rewrite each GEMM the finder converts into quantize -> (rearrange) -> scaled GEMM.

2Dx3D and dense (contraction on A's last dim and B's dim -2)::

    y = _grouped_mm(a, b, offs)         qa, sa = mxfp8.quantize(a, -1, mode)
                                  ->    qb, sb = mxfp8.quantize(b, -2, mode)
                                        y = mxfp8.scaled_grouped_mm(qa, sa, qb, sb, offs, dtype)

2Dx2D (the wgrad contracts over tokens, so both operands are quantized along tokens per group,
each group zero-padded to 32 rows; the padded offsets are computed on the device)::

    dw = _grouped_mm(dy^T, x, offs)     qd, sd, po = mxfp8.quantize_token_groups(dy, offs, mode)
                                  ->    qx, sx, _ = mxfp8.quantize_token_groups(x, offs, mode)
                                        dw = mxfp8.scaled_grouped_mm(qd^T, sd^T, qx, sx, po, dtype)

The emulated target consumes MX scales as they are, so no rearrange node is inserted for it.
A dense ``addmm`` keeps its bias as an ``add`` after the GEMM.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from mxfp8_compile.config import Config
from mxfp8_compile.passes._graph import insert_call, insert_multi
from mxfp8_compile.passes.find_gemms import GemmMatch, Operand
from mxfp8_compile.passes.report import Layout

mxfp8 = torch.ops.mxfp8
aten = torch.ops.aten


def rewrite_gemms(graph: fx.Graph, matches: list[GemmMatch], config: Config) -> int:
    """Rewrite every converted match in place; returns how many GEMMs were rewritten."""
    done = 0
    for match in matches:
        if match.decision:
            _replace(graph, match, _emit(graph, match, config))
            done += 1
    return done


def _emit(graph: fx.Graph, m: GemmMatch, config: Config) -> fx.Node:
    provenance = f"rewrite_gemms:{m.site.label}"

    def call(target: object, *args: object) -> fx.Node:
        return insert_call(graph, target, args, like=m.node, provenance=provenance)

    def multi(target: object, *args: object) -> list[fx.Node]:
        return insert_multi(graph, target, args, like=m.node, provenance=provenance)

    def transposed(node: fx.Node) -> fx.Node:
        return call(aten.permute.default, node, [1, 0] if node.meta["val"].dim() == 2 else [0, 2, 1])

    def materialize(op: Operand) -> fx.Node:
        return transposed(op.node) if op.transposed else op.node

    mode = config.scale_mode
    if m.site.layout is Layout.GROUPED_2D2D:
        # A is (N, M): quantize its token-major transpose (M, N), then view the result back.
        a_tokens = m.a.node if m.a.transposed else transposed(m.a.node)
        qa, sa, padded_offs = multi(mxfp8.quantize_token_groups.default, a_tokens, m.offs, mode)
        qb, sb, _ = multi(mxfp8.quantize_token_groups.default, materialize(m.b), m.offs, mode)
        return call(
            mxfp8.scaled_grouped_mm.default, transposed(qa), transposed(sa), qb, sb, padded_offs, m.out_dtype
        )
    qa, sa = multi(mxfp8.quantize.default, materialize(m.a), -1, mode)
    qb, sb = multi(mxfp8.quantize.default, materialize(m.b), -2, mode)
    if m.site.layout is Layout.DENSE:
        out = call(mxfp8.scaled_mm.default, qa, sa, qb, sb, m.out_dtype)
        return out if m.bias is None else call(aten.add.Tensor, out, m.bias)
    return call(mxfp8.scaled_grouped_mm.default, qa, sa, qb, sb, m.offs, m.out_dtype)


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
