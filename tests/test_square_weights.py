"""Square-block weights (``Config.weight_blocks="32x32"``): each weight cast once, in 32x32
tiles, for both the forward (along K) and the dgrad (along N): the emulated target, and sm90,
whose two rebased orientations come from one grid of tile scales."""

from __future__ import annotations

import collections
import operator

import pytest
import torch

import mxfp8_compile
from compare import compare, mse_to
from mxfp8_compile import Config, numerics
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.lowering import targets

mxfp8 = torch.ops.mxfp8


def _compile(config: Config, graphs: dict):
    return lambda m: torch.compile(m, backend=mxfp8_compile.backend(config, inductor=False, on_graph=graphs.__setitem__))


def test_each_weight_is_cast_once_for_forward_and_dgrad() -> None:
    counts, results = {}, {}
    for blocks in ("1x32", "32x32"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, (x,) = build(MoEConfig(layers=1))  # afresh: compare leaves its gradients on the model
        graphs: dict[str, torch.fx.GraphModule] = {}
        results[blocks] = compare(model, _compile(Config(target="emulated", weight_blocks=blocks), graphs),
                                  (x,), mse_to("random"))
        joint = graphs["joint"].graph
        counts[blocks] = collections.Counter(n.target for n in joint.nodes)
        if blocks == "32x32":
            squares = list(joint.find_nodes(op="call_function", target=mxfp8.quantize_square.default))
            # every cast of a weight is a square one: no row cast reads a graph input
            row_casts = joint.find_nodes(op="call_function", target=mxfp8.quantize.default)
            assert not [n for n in row_casts if n.args[0].op == "placeholder"]
    weights = {name for name, p in model.named_parameters() if p.dim() >= 2
               and any(k in name for k in ("proj", "experts", "shared_expert"))}
    assert len(weights) == 10  # q k v o, shared w1 w2 w3, experts w1 w2 w3
    assert counts["32x32"][mxfp8.quantize_square.default] == len(squares) == len(weights)
    # one square cast replaces the forward's and the dgrad's row casts of each weight
    assert counts["1x32"][mxfp8.quantize.default] - counts["32x32"][mxfp8.quantize.default] == 2 * len(weights)
    assert counts["1x32"][mxfp8.scaled_mm.default] == counts["32x32"][mxfp8.scaled_mm.default] == 21
    for blocks, r in results.items():  # the emulated target's bars (test_compile_moe)
        assert r.output >= 23 and r.input_grad >= 29 and r.worst_weight[1] >= 21, (blocks, r)


def test_square_tiles_cost_precision_only_past_e4m3s_range_under_the_tile_maximum() -> None:
    # e4m3's relative precision does not depend on the scale: a block scaled by its tile's larger
    # power of two dequantizes to the same values unless its elements fall below e4m3's normal
    # range (2^-6 of the scale, about 2^-15 of the tile maximum). Gaussian weights (as
    # initialised) stay there; a weight with outliers 10^5 x its spread does not.
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4, 256, 256, generator=g) * 0.02).to(torch.bfloat16)
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[:, ::64, ::64] = False  # the outliers' places: one in every other tile row and column

    def sqnr_of_the_rest(x: torch.Tensor) -> tuple[float, float]:
        blocks = numerics.from_mx(*numerics.to_mx(x))
        q, tiles = numerics.to_mx_square(x)
        square = numerics.from_mx(q, numerics.square_scales_along(tiles, -1))
        return numerics.sqnr(x.float()[rest], blocks[rest]), numerics.sqnr(x.float()[rest], square[rest])

    blocks_db, square_db = sqnr_of_the_rest(w)
    assert abs(blocks_db - square_db) < 1e-3 and blocks_db > 31
    x = w.clone()
    x[~rest] = 20.0  # 1000x the spread: the rest of their tiles stays in e4m3's normal range
    blocks_db, square_db = sqnr_of_the_rest(x)
    assert blocks_db - square_db < 1e-3
    x[~rest] = 2000.0  # 10^5 x: it falls into the subnormals under the tile's scale
    blocks_db, square_db = sqnr_of_the_rest(x)
    assert blocks_db - square_db > 10, (blocks_db, square_db)


def test_sm90_casts_each_orientation_of_a_weight_from_one_tile_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sm90 target on the CPU (its ops run their emulation): the forward finds each weight's
    # tile scales; the dgrad reads them, transposed, instead of the weight's maxima; the
    # partitioner saves those few bytes for the backward, not an e4m3 copy of the weight.
    monkeypatch.setattr(targets, "device_capability", lambda device: targets.SM90)
    results, counts = {}, {}
    for blocks in ("1x32", "32x32"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, (x,) = build(MoEConfig(layers=1))
        graphs: dict[str, torch.fx.GraphModule] = {}
        config = Config(target="sm90", weight_blocks=blocks, cost_model=False)
        results[blocks] = compare(model, _compile(config, graphs), (x,), mse_to("random"))
        counts[blocks] = collections.Counter(n.target for n in graphs["joint"].graph.nodes)
    weights = {p for name, p in model.named_parameters() if p.dim() >= 2
               and any(k in name for k in ("proj", "experts", "shared_expert"))}
    joint = graphs["joint"].graph
    tiles = joint.find_nodes(op="call_function", target=mxfp8.square_tile_scales.default)
    casts = joint.find_nodes(op="call_function", target=mxfp8.quantize_rebase_square.default)
    assert len(tiles) == len(weights) == 10 and len(casts) == 20
    # each weight's tile scales, found on the weight as stored, feed both of its casts: the
    # weight's with them, its transpose's with them transposed
    for grid in tiles:
        weight = grid.args[0]
        assert weight.op == "placeholder"
        readers = [c for c in casts if grid in (c.args[1], c.args[1].args[0])]
        assert sorted((c.args[0] is weight, c.args[1] is grid) for c in readers) == [(False, False), (True, True)]
    assert not [n for n in joint.find_nodes(op="call_function", target=mxfp8.quantize_rebase.default)
                if n.args[0].op == "placeholder" or n.args[0].args[0].op == "placeholder"]
    assert counts["1x32"][mxfp8.quantize_rebase.default] - counts["32x32"][mxfp8.quantize_rebase.default] == 2 * 10
    def source(v: torch.fx.Node) -> torch.fx.Node:  # through the views the partitioner may save
        return source(v.args[0]) if v.target is torch.ops.aten.permute.default else v

    saved = [source(v) for v in graphs["forward"].graph.output_node().args[0] if isinstance(v, torch.fx.Node)]
    # the tile scales, not a cast weight
    assert sum(v.target is mxfp8.square_tile_scales.default for v in saved) == 10
    assert not [v for v in saved if v.target is operator.getitem and v.args[0].target is mxfp8.quantize_rebase_square.default]
    for blocks, r in results.items():  # test_sm90's bars
        assert r.output >= 23 and r.input_grad >= 29 and r.worst_weight[1] >= 21, (blocks, r)


def test_sm100_refuses_square_weights_and_says_what_runs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "device_capability", lambda device: targets.SM100_PROVEN[0])
    model, (x,) = build(MoEConfig(layers=1))
    with pytest.raises(Exception, match=r"weight_blocks='32x32'\) runs on the sm90 and emulated targets only so far; "
                                        r"this graph's target is sm100"):
        torch.compile(model, backend=mxfp8_compile.backend(Config(target="sm100", weight_blocks="32x32"),
                                                           inductor=False))(x)
