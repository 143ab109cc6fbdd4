"""Find the token permutation an activation comes out of, so that its casts read the source.

The activation a routed expert's grouped GEMM reads is a permutation of rows the graph holds
anyway: in the forward the tokens sorted by expert, ``src[rows]`` (HF's ``hidden[token_idx]``,
torchtitan's ``x[token_indices // top_k]``); in the backward the combine's gradient gathered the
same way, times each row's routing weight. Written out, the permuted (M, K) copy costs a kernel
that reads the source and writes the copy (2 bytes moved per input byte) before the casts read
it. Cast through ``rows`` (sm90's ``mxfp8.quantize_rebase_gathered`` and
``quantize_rebase_token_groups_gathered``, sm100's ``quantize_rows_and_token_groups_gathered``),
the casts read the source instead and the copy is never written::

    x = index(src, [rows])                                    ->  Gather(src, rows, None)
    x = mul(expand(index(src, [rows])), w)                    ->  Gather(src, rows, w)
    x = convert(mul(convert(index(src, [rows]), f32), w), src.dtype)   (the same)
    x = gather(src, 0, rows.view(-1, 1).expand(-1, K))       ->  Gather(src, rows, None)
    x = index_put(zeros, [inverse], src)    (inverse[order] = arange, order a sort's indices)
                                                              ->  Gather(src, order, None)

``w`` is one weight per row, (M, 1); the product, whatever dtype the ``mul`` runs in, is
rounded once to ``src``'s dtype, which is ``numerics.gather_rows``'s contract. Anything else
(a mask index, a gather along another dim, a weight per column, a product kept in fp32 for
an operand in bf16) is not a gather the casts can read through, and stays as it is.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx

from mxfp8_compile.numerics import HIGH_PRECISION_DTYPES

aten = torch.ops.aten
_CONVERT = torch.ops.prims.convert_element_type.default
_IOTA = torch.ops.prims.iota.default
_SORTS = (aten.sort.default, aten.sort.stable)
_INDEX_DTYPES = (torch.int32, torch.int64)


class Gather(NamedTuple):
    """``numerics.gather_rows(src, rows, weights)``: ``weights`` a (M, 1) node, or None."""

    src: fx.Node
    rows: fx.Node
    weights: fx.Node | None


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_call(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _same_shape(node: fx.Node, like: fx.Node) -> bool:
    return _val(node) is not None and _val(like) is not None and _val(node).shape == _val(like).shape


def _same_width(node: fx.Node, like: fx.Node) -> bool:
    return _val(node) is not None and _val(like) is not None and _val(node).shape[1:] == _val(like).shape[1:]


def _converted_to(node: fx.Node) -> torch.dtype | None:
    """The dtype ``node`` casts its input to, if a dtype cast is all it does (``prims`` after
    decomposition, ``aten._to_copy`` before)."""
    if _is_call(node, _CONVERT):
        return node.args[1]
    if _is_call(node, aten._to_copy.default) and set(node.kwargs) == {"dtype"} and len(node.args) == 1:
        return node.kwargs["dtype"]
    return None


def _peel(node: fx.Node) -> fx.Node:
    """``node`` through what changes neither its rows nor their values: an ``expand`` to its own
    shape, a cast to fp32 (exact from bf16, fp16 and fp32)."""
    while (_is_call(node, aten.expand.default) and _same_shape(node, node.args[0])
           or _converted_to(node) == torch.float32):
        node = node.args[0]
    return node


def _column_of(node: fx.Node) -> fx.Node | None:
    """``rows`` where ``node`` is ``rows`` (1D) as a column, expanded across the features
    (``gather``'s index for whole rows: ``rows.view(-1, 1).expand(-1, K)``)."""
    if not _is_call(node, aten.expand.default):
        return None
    column = node.args[0]
    if not _is_call(column, aten.view.default, aten.reshape.default, aten.unsqueeze.default):
        return None
    shape = _val(column).shape if _val(column) is not None else ()
    return column.args[0] if len(shape) == 2 and shape[1] == 1 else None


def _sort_order(node: fx.Node) -> bool:
    """Whether ``node`` is the indices of a 1D sort: a permutation of ``range(len)``."""
    if not _is_call(node, operator.getitem) or node.args[1] != 1 or not _is_call(node.args[0], *_SORTS):
        return False
    keys = _val(node.args[0].args[0])
    return keys is not None and keys.dim() == 1


def _counting(node: object, n: int) -> bool:
    """Whether ``node`` is ``0, 1, ..., n - 1``."""
    if _is_call(node, _IOTA):
        return node.args[0] == n and node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1
    if _is_call(node, aten.arange.default):
        return node.args[0] == n
    return _is_call(node, aten.arange.start) and node.args[0] == 0 and node.args[1] == n


def _inverted(node: object) -> fx.Node | None:
    """``order`` where ``node`` is its inverse permutation, ``inverse[order] = arange(M)`` (HF's
    unsort index), ``order`` a sort's indices."""
    if not _is_call(node, aten.index_put.default) or len(node.args[1]) != 1 or _accumulates(node):
        return None
    order = node.args[1][0]
    if not _sort_order(order) or not _same_shape(node, order):
        return None
    return order if _counting(node.args[2], _val(order).shape[0]) else None


def _accumulates(node: fx.Node) -> bool:
    return bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False))


def _zeros(node: object, like: fx.Node) -> bool:
    """Whether ``node`` is zeros of ``like``'s shape."""
    zeros = _is_call(node, aten.zeros.default, aten.new_zeros.default) or (
        _is_call(node, aten.full.default) and node.args[1] == 0)
    return zeros and _same_shape(node, like)


def _index(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(src, rows)`` of ``src[rows]`` along dim 0 (``index``, ``index_select``, ``gather`` of
    whole rows: torchtitan's scatter_add backward, or rows scattered by the inverse of a sort's
    permutation into zeros: HF's unsort backward), src 2D high precision and rows 1D
    int32/int64."""
    if _is_call(node, aten.index.Tensor) and len(node.args[1]) == 1:
        src, rows = node.args[0], node.args[1][0]
    elif _is_call(node, aten.index_select.default) and node.args[1] in (0, -2):
        src, rows = node.args[0], node.args[2]
    elif _is_call(node, aten.gather.default) and node.args[1] in (0, -2) and _same_width(node, node.args[0]):
        src, rows = node.args[0], _column_of(node.args[2])
    elif (_is_call(node, aten.index_put.default) and len(node.args[1]) == 1 and _zeros(node.args[0], node)
          and _same_shape(node.args[2], node)):
        # out[inverse[i]] = src[i] with inverse = order's inverse is out[k] = src[order[k]]: each
        # row written once (with accumulate, as 0 + x, which gives +0.0 where the gather gives -0.0)
        src, rows = node.args[2], _inverted(node.args[1][0])
    else:
        return None
    src_val, rows_val = _val(src), _val(rows) if isinstance(rows, fx.Node) else None
    if src_val is None or rows_val is None or src_val.dim() != 2 or src_val.dtype not in HIGH_PRECISION_DTYPES:
        return None
    if rows_val.dim() != 1 or rows_val.dtype not in _INDEX_DTYPES:
        return None
    return src, rows


def _row_weights(node: fx.Node, gathered: fx.Node) -> bool:
    """Whether ``node`` is one high-precision weight per row of ``gathered`` (M, K): (M, 1)."""
    val, rows = _val(node), _val(gathered)
    return (val is not None and rows is not None and val.dim() == 2 and val.dtype in HIGH_PRECISION_DTYPES
            and val.shape[1] == 1 and val.shape[0] == rows.shape[0])


def gathered_rows(node: fx.Node) -> Gather | None:
    """The gather ``node`` (2D) is, as ``Gather``; None if it is not one the casts can read
    through."""
    want = _val(node)
    if want is None or want.dim() != 2:
        return None
    if _converted_to(node) is not None:  # the product rounded to its dtype
        node = node.args[0]
    index = _index(node)
    if index is not None:
        return Gather(*index, None) if _val(index[0]).dtype == want.dtype else None
    if not _is_call(node, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    for gathered, weights in (node.args, node.args[::-1]):
        index = _index(_peel(gathered))
        if index is not None and _val(index[0]).dtype == want.dtype and _row_weights(_peel(weights), gathered):
            return Gather(*index, _peel(weights))
    return None
