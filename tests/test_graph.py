"""Graph plumbing of the passes: traced functions inserted into a graph."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from mxfp8_compile import numerics
from mxfp8_compile.passes import _graph


def _graph_of(*shapes: tuple[int, ...]) -> tuple[fx.Graph, list[fx.Node], fx.Node]:
    graph = fx.Graph()
    with FakeTensorMode():
        placeholders = []
        for i, shape in enumerate(shapes):
            node = graph.placeholder(f"s{i}")
            node.meta["val"] = torch.empty(shape, dtype=torch.uint8)
            placeholders.append(node)
    out = graph.output(None)
    return graph, placeholders, out


def test_a_traced_function_is_traced_once_and_replayed_with_each_shape() -> None:
    graph, (a, b, c), out = _graph_of((7,), (3,), (4, 5))
    before = len(_graph._TRACES)
    results = [_graph.insert_traced(graph, numerics.e8m0_to_fp32, [s], like=out, provenance="test") for s in (a, b, c)]
    # one trace for the two 1D arguments, one for the 2D one (unless an earlier test made them)
    assert len(_graph._TRACES) - before <= 2
    assert {k[1:] for k in _graph._TRACES if k[0] is numerics.e8m0_to_fp32} >= {
        ((torch.uint8, torch.device("cpu"), 1),), ((torch.uint8, torch.device("cpu"), 2),)}
    assert [tuple(r.meta["val"].shape) for r in results] == [(7,), (3,), (4, 5)]
    assert all(r.meta["val"].dtype == torch.float32 and r.meta["mxfp8"] == "test" for r in results)
    # the replayed ops compute the function: run the graph on real bytes
    out.args = (tuple(results),)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    inputs = [torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8),
              torch.tensor([3, 200, 255], dtype=torch.uint8), torch.arange(20, dtype=torch.uint8).reshape(4, 5)]
    for got, x in zip(gm(*inputs), inputs, strict=True):
        assert torch.equal(got.view(torch.int32), numerics.e8m0_to_fp32(x).view(torch.int32))
