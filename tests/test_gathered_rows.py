"""Which token permutations the casts read through (passes/gathered_rows.py), and the reference
they are checked against (numerics.gather_rows)."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mxfp8_compile import numerics
from mxfp8_compile.passes.gathered_rows import gathered_rows

BF16, F32 = torch.bfloat16, torch.float32
M, T, K = 12, 8, 64


def _output(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> tuple[torch.fx.Node, dict[str, torch.fx.Node]]:
    """The node ``fn`` returns, traced with fake tensors, and the graph's inputs by position."""
    gm = make_fx(fn, tracing_mode="fake")(*args)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return next(n for n in gm.graph.nodes if n.op == "output").args[0], inputs


def _inputs(src_dtype: torch.dtype = BF16, w_dtype: torch.dtype = BF16) -> tuple[torch.Tensor, ...]:
    return torch.randn(T, K, dtype=src_dtype), torch.randint(0, T, (M,)), torch.rand(M, 1, dtype=w_dtype)


@pytest.mark.parametrize("fn, weighted, w_dtype", [
    (lambda src, rows, w: src[rows], False, BF16),
    (lambda src, rows, w: torch.index_select(src, 0, rows), False, BF16),
    (lambda src, rows, w: src[rows] * w, True, BF16),  # HF's combine backward: bf16 throughout
    (lambda src, rows, w: w * src[rows].expand(M, K), True, BF16),
    # torchtitan's: the product in fp32, rounded back to the operand's dtype
    (lambda src, rows, w: (src[rows].float() * w).to(BF16), True, F32),
    (lambda src, rows, w: (src[rows].float() * w.float()).to(BF16), True, BF16),
    # torchtitan's scatter_add backward: a gather of whole rows
    (lambda src, rows, w: (src.gather(0, rows.view(-1, 1).expand(-1, K)).float() * w).to(BF16), True, F32),
    (lambda src, rows, w: torch.gather(src, 0, rows.unsqueeze(1).expand(M, K)), False, BF16),
])
def test_the_permutations_the_casts_read_through(fn, weighted: bool, w_dtype: torch.dtype) -> None:
    out, (src, rows, w) = _output(fn, *_inputs(w_dtype=w_dtype))
    gather = gathered_rows(out)
    assert gather is not None and gather.src is src and gather.rows is rows
    assert (gather.weights is not None) == weighted
    if weighted:  # the weight node itself or its cast to fp32, one value per row
        assert gather.weights.meta["val"].shape == (M, 1)


def _unsort(src: torch.Tensor, keys: torch.Tensor, start: int = 0, accumulate: bool = True,
            order: torch.Tensor | None = None) -> torch.Tensor:
    """HF's unsort backward: ``src``'s rows scattered into zeros by the inverse of ``keys``' sort."""
    order = torch.sort(keys).indices if order is None else order
    inverse = torch.empty(M, dtype=torch.int64).index_put((order,), torch.arange(start, start + M))
    return torch.zeros(M, K, dtype=src.dtype).index_put((inverse,), src, accumulate=accumulate)


@pytest.mark.parametrize("accumulate", [True, False])
def test_rows_scattered_by_an_inverse_permutation_are_gathered_by_it(accumulate: bool) -> None:
    # HF 5.x's combine unsorts with the inverse of the sort's permutation; its backward scatters
    # the gradient by that inverse, which gathers it by the sort's order
    src, keys = torch.randn(M, K, dtype=BF16), torch.randn(M)
    out, (src_node, _) = _output(lambda s, k: _unsort(s, k, accumulate=accumulate) * 2, src, keys)
    gather = gathered_rows(out.args[0])
    assert gather is not None and gather.src is src_node and gather.weights is None
    order = gather.rows
    assert order.target is operator.getitem and order.args[0].target in (torch.ops.aten.sort.default, torch.ops.aten.sort.stable)
    assert torch.equal(_unsort(src, keys, accumulate=accumulate), numerics.gather_rows(src, torch.sort(keys).indices))


@pytest.mark.parametrize("fn, why", [
    (lambda s, k: _unsort(s, k, start=1), "not the inverse: the counting starts at 1"),
    (lambda s, k: _unsort(s, k, order=k.argsort()[torch.arange(M) % (M // 2)]), "an order that is not a permutation"),
    (lambda s, k: torch.ones(M, K, dtype=s.dtype).index_put((torch.sort(k).indices,), s, accumulate=True),
     "a scatter into ones"),
])
def test_scatters_that_are_not_gathers(fn, why: str) -> None:
    out, _ = _output(fn, torch.randn(M, K, dtype=BF16), torch.randn(M))
    assert gathered_rows(out) is None, why


@pytest.mark.parametrize("fn, src_dtype, w_dtype, why", [
    (lambda src, rows, w: src[:, rows[:4] % K], BF16, BF16, "a gather along the features"),
    (lambda src, rows, w: src[src[:, 0] > 0], BF16, BF16, "a boolean mask: rows not known until it runs"),
    (lambda src, rows, w: src[rows] * w[0], BF16, BF16, "a weight per feature, not per row"),
    (lambda src, rows, w: src[rows].float() * w, BF16, F32, "the product kept in fp32: not the source's rounding"),
    (lambda src, rows, w: src[rows].to(BF16), F32, BF16, "a source in another dtype"),
    (lambda src, rows, w: src[rows] + w, BF16, BF16, "not a product"),
    (lambda src, rows, w: src[rows].relu(), BF16, BF16, "any other op of the gather"),
    (lambda src, rows, w: src.gather(0, rows.view(-1, 1).expand(-1, K // 2)), BF16, BF16, "part of each row"),
    (lambda src, rows, w: src.gather(0, rows.view(-1, 2)[:, :1].expand(-1, K)), BF16, BF16, "rows from a 2D index"),
])
def test_what_is_not_read_through(fn, src_dtype: torch.dtype, w_dtype: torch.dtype, why: str) -> None:
    out, _ = _output(fn, *_inputs(src_dtype, w_dtype))
    assert gathered_rows(out) is None, why


def test_gather_rows_is_index_then_one_rounding() -> None:
    src, rows, w = torch.randn(T, K, dtype=BF16), torch.tensor([0, -1, 3, 3]), torch.rand(4, dtype=F32) * 3
    assert torch.equal(numerics.gather_rows(src, rows), src[[0, T - 1, 3, 3]])
    # rounded once from the fp32 product: not what a bf16 weight (a second rounding) gives
    want = (src[rows].float() * w[:, None]).to(BF16)
    assert torch.equal(numerics.gather_rows(src, rows, w), want)
    assert not torch.equal(want, src[rows] * w[:, None].to(BF16))


@pytest.mark.parametrize("rows, weights, error", [
    (torch.tensor([0.0]), None, "int32 or int64"),
    (torch.tensor([[0]]), None, "1D"),
    (torch.tensor([0, 1]), torch.ones(3), "one per gathered row"),
    (torch.tensor([0, 1]), torch.ones(2, dtype=torch.int32), "weights must be bfloat16"),
])
def test_gather_rows_names_bad_arguments(rows: torch.Tensor, weights: torch.Tensor | None, error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        numerics.gather_rows(torch.randn(T, K), rows, weights)
