"""The sm90 target on CPU: its GEMMs run through their exact emulation; the capability check
is monkeypatched to report an SM90 device. The same path runs for real in test_gpu.py."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import mxfp8_compile
from compare import compare, mse_to
from mxfp8_compile import Config, ops
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.lowering import targets
from mxfp8_compile.numerics import e8m0_to_fp32, sqnr
from mxfp8_compile.passes.gathered_rows import gathered_rows

BF16 = torch.bfloat16
# the rewrite of every GEMM, including those the cost model would keep at these small sizes
SM90_EVERY_GEMM = Config(target="sm90", cost_model=False)


@pytest.fixture
def pretend_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "device_capability", lambda device: targets.SM90)


def _operands(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(200, 128, generator=g).to(BF16),
        "w": (torch.randn(4, 96, 128, generator=g) / 11).to(BF16),
        "dy": torch.randn(200, 96, generator=g).to(BF16),
        "offs": torch.tensor([0, 61, 130, 200], dtype=torch.int32),
    }


def _rebased(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows rebased along the last dim, their scales decoded to fp32 as the rowwise GEMMs take them."""
    r, rs = ops.rebase_rowwise(q, s, -1)
    return r, e8m0_to_fp32(rs)


def test_rowwise_grouped_gemms_match_the_mx_gemms() -> None:
    t = _operands()
    # forward 2Dx3D: rebased rowwise operands against the exact MX operands
    q, s = ops.quantize(t["x"])
    qbt, sbt = ops.quantize(t["w"])  # B^T = W, along K
    ra, rsa = _rebased(q, s)
    rbt, rsb = _rebased(qbt, sbt)
    mx = ops.scaled_grouped_mm(q, s, qbt.mT, sbt.mT, t["offs"], BF16)
    rowwise = ops.scaled_grouped_mm_rowwise(ra, rsa, rbt.mT, rsb, t["offs"], BF16, False)
    assert sqnr(mx, rowwise) >= 45
    # wgrad 2Dx2D, token groups
    qd, sd, po = ops.quantize_token_groups(t["dy"], t["offs"])
    qx, sx, _ = ops.quantize_token_groups(t["x"], t["offs"])
    mx = ops.scaled_grouped_mm(qd.t(), sd.t(), qx, sx, po, BF16)
    rd, rsd = ops.rebase_token_groups(qd, sd, po)
    rx, rsx = ops.rebase_token_groups(qx, sx, po)
    rowwise = ops.scaled_grouped_mm_rowwise(rd.t(), e8m0_to_fp32(rsd), rx, e8m0_to_fp32(rsx), po, BF16, False)
    assert rowwise.shape == (4, 96, 128) and not rowwise[0].any()  # the empty first group
    assert sqnr(mx, rowwise) >= 45
    # dense
    mx = ops.scaled_mm(q, s, qbt[1].t(), sbt[1].t(), BF16)
    rowwise = ops.scaled_mm_rowwise(ra, rsa, rbt[1].t(), rsb[1], BF16, False)
    assert sqnr(mx, rowwise) >= 45


def test_bad_rowwise_scales_are_named() -> None:
    t = _operands()
    q, s = ops.quantize(t["x"])
    ra, rsa = _rebased(q, s)
    qbt, sbt = ops.quantize(t["w"])
    rbt, rsb = _rebased(qbt, sbt)
    with pytest.raises(ValueError, match=r"B row scales have shape \(4, 48\), expected \(4, 96\)"):
        ops.scaled_grouped_mm_rowwise(ra, rsa, rbt.mT, rsb[:, :48], t["offs"], BF16, False)
    with pytest.raises(TypeError, match=r"A row scales must be float32 \(numerics.e8m0_to_fp32"):
        ops.scaled_grouped_mm_rowwise(ra, ops.rebase_rowwise(q, s, -1)[1], rbt.mT, rsb, t["offs"], BF16, False)


@pytest.mark.usefixtures("pretend_sm90")
def test_sm90_rewrite_of_the_moe_layer() -> None:
    model, (x,) = build(MoEConfig(layers=1))
    graphs: dict[str, torch.fx.GraphModule] = {}
    sm90 = lambda m: torch.compile(  # noqa: E731
        m, backend=mxfp8_compile.backend(SM90_EVERY_GEMM, inductor=False, on_graph=graphs.__setitem__)
    )
    result = compare(model, sm90, (x,), mse_to("random"))
    report = mxfp8_compile.last_report()
    assert report.target == "sm90" and len(report.converted()) == 30
    targets_in_graph = collections.Counter(str(n.target) for n in graphs["joint"].graph.nodes)
    assert {"mxfp8.quantize_rebase.default", "mxfp8.scaled_grouped_mm_rowwise.default",
            "mxfp8.scaled_mm_rowwise.default"} <= set(targets_in_graph)
    assert not {"mxfp8.scaled_grouped_mm.default", "aten._grouped_mm.default"} & set(targets_in_graph)
    # every activation an expert GEMM casts along K and its wgrad along tokens is cast once each
    # way: x (shared by the gate and up projections), h (down), and the backward's dy of each;
    # the two that a token permutation produces (x, and the down projection's dy: the combine's
    # gradient gathered, times the routing weight) read its source through the permutation
    assert targets_in_graph["mxfp8.quantize_rebase_token_groups.default"] == 3
    gathered = [n for n in graphs["joint"].graph.nodes if n.target is torch.ops.mxfp8.quantize_rebase_token_groups_gathered.default]
    assert sorted(n.args[2] is not None for n in gathered) == [False, True]  # dy's has the weights
    # and no other cast reads a permutation
    casts = {torch.ops.mxfp8.quantize_rebase.default, torch.ops.mxfp8.quantize_rebase_token_groups.default}
    assert not [n for n in graphs["joint"].graph.nodes if n.target in casts and gathered_rows(n.args[0])]
    # each GEMM reads fp32 scales decoded by graph ops (which Inductor fuses), not by the op itself
    rowwise = [n for gm in graphs.values() for n in gm.graph.nodes if str(n.target).endswith("mm_rowwise.default")]
    assert rowwise
    for gemm in rowwise:
        for scale in (gemm.args[1], gemm.args[3]):
            assert scale.target == torch.ops.aten.view.dtype and scale.meta["val"].dtype == torch.float32
    # the same bars as the emulated target (test_compile_moe), which the rebase barely moves
    assert result.output >= 23 and result.input_grad >= 29 and result.worst_weight[1] >= 21
    emulated = compare(model, lambda m: torch.compile(m, backend=mxfp8_compile.backend(Config(target="emulated"), inductor=False)),
                       (x,), mse_to("random"))
    assert abs(emulated.output - result.output) < 1.0


@pytest.mark.usefixtures("pretend_sm90")
@pytest.mark.parametrize("fast_accum", [(), ("forward",), ("dgrad", "wgrad")])
def test_fast_accum_reaches_the_gemms_of_its_roles(fast_accum: tuple[str, ...]) -> None:
    model, (x,) = build(MoEConfig(layers=1, dim=64, expert_hidden=64, experts=4))
    graphs: dict[str, torch.fx.GraphModule] = {}
    config = Config(target="sm90", fast_accum=fast_accum, cost_model=False)
    compiled = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=False, on_graph=graphs.__setitem__))
    compiled(x).sum().backward()
    roles = collections.Counter(site.role.value for site in mxfp8_compile.last_report().converted())
    rowwise = [n for n in graphs["joint"].graph.nodes if str(n.target).endswith("mm_rowwise.default")]
    assert len(rowwise) == sum(roles.values()) == 30
    assert sum(n.args[-1] is True for n in rowwise) == sum(roles[r] for r in fast_accum)
    assert all(isinstance(n.args[-1], bool) for n in rowwise)


@pytest.mark.usefixtures("pretend_sm90", "no_compile_caches")
def test_sm90_rewrite_lowers_through_inductor() -> None:
    # Inductor lowers every node the rewrite inserts (the traced scale decoding included); on the
    # CPU the ops run their emulation, held to test_sm90_rewrite_of_the_moe_layer's bars
    model, (x,) = build(MoEConfig(layers=1, dim=64, expert_hidden=64, experts=4))
    sm90 = lambda m: torch.compile(m, backend=mxfp8_compile.backend(SM90_EVERY_GEMM))  # noqa: E731
    result = compare(model, sm90, (x,), mse_to("random"))
    report = mxfp8_compile.last_report()
    assert report.target == "sm90" and len(report.converted()) == 30  # as in test_sm90_rewrite_of_the_moe_layer
    assert result.output >= 23 and result.input_grad >= 29 and result.worst_weight[1] >= 21


def test_target_choice() -> None:
    cpu = torch.device("cpu")
    assert targets.select_target(Config(), cpu) == "emulated"
    assert targets.select_target(Config(target="emulated"), cpu) == "emulated"
    with pytest.raises(ValueError, match=r"Config\(target='sm90'\) needs an SM90 GPU \(H100, H200\); this graph's GEMMs run on cpu"):
        targets.select_target(Config(target="sm90"), cpu)
    with pytest.raises(ValueError, match=r"Config\(target='sm100'\) needs an SM100 GPU"):
        targets.select_target(Config(target="sm100"), cpu)


def test_auto_picks_sm90_only_on_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    for capability, expected in (((9, 0), "sm90"), ((8, 0), "emulated"), ((10, 0), "sm100"), ((12, 0), "emulated")):
        monkeypatch.setattr(targets, "device_capability", lambda device, c=capability: c)
        assert targets.select_target(Config(), cuda) == expected


@pytest.mark.usefixtures("pretend_sm90")
def test_shared_activations_are_cast_once_each_way() -> None:
    # x (read by the gate and the up projection), h, and the backward's dy of each expert GEMM:
    # one row cast and one token-group cast each, whatever the number of GEMMs that read them
    model, (x,) = build(MoEConfig(layers=1, dim=128, heads=4, expert_hidden=64, experts=2, shared_hidden=0))
    graphs: dict[str, torch.fx.GraphModule] = {}
    compiled = torch.compile(model, backend=mxfp8_compile.backend(SM90_EVERY_GEMM, inductor=False,
                                                                   on_graph=graphs.__setitem__))
    compiled(x).float().sum().backward()
    nodes = list(graphs["joint"].graph.nodes)
    groups = [n for n in nodes if n.target == torch.ops.mxfp8.quantize_rebase_token_groups.default]
    gathered = [n for n in nodes if n.target == torch.ops.mxfp8.quantize_rebase_token_groups_gathered.default]
    # x and the down projection's dy, read through the token permutation that produces them
    assert [n.args[0].meta["val"].shape[-1] for n in gathered] == [128, 128]
    assert len(groups) == 3
    for group_casts, row_cast, args in ((groups, torch.ops.mxfp8.quantize_rebase.default, 1),
                                        (gathered, torch.ops.mxfp8.quantize_rebase_gathered.default, 3)):
        for cast in group_casts:
            rows = [n for n in nodes if n.target == row_cast and n.args[:args] == cast.args[:args]]
            assert len(rows) == 1, cast.args[:args]


def _cuda_checked_grouped_mm(real, seen: list[list[int]]):
    """``torch._grouped_mm`` with CUDA's operand check (``prepare_grouped_gemm_data``) run first:
    in a 2D x 2D grouped GEMM, an operand contiguous along the tokens it contracts needs every
    group's token count to be a multiple of 16 bytes."""

    def grouped_mm(a, b, offs=None, **kwargs):
        if a.dim() == 2 and b.dim() == 2:
            sizes = torch.diff(offs, prepend=offs.new_zeros(1))
            seen.append(sizes.tolist())
            for name, operand, token_dim in (("A", a, 1), ("B", b, 0)):
                if operand.stride(token_dim) == 1:
                    align = 16 // operand.element_size()
                    assert bool((sizes % align == 0).all()), (
                        f"operand {name} {tuple(operand.shape)} strides {operand.stride()} is contiguous along "
                        f"tokens: CUDA would assert on group sizes {sizes.tolist()}")
        return real(a, b, offs, **kwargs)

    return grouped_mm


@pytest.mark.usefixtures("pretend_sm90", "no_compile_caches")
def test_a_grouped_wgrad_kept_in_bf16_gets_operands_cuda_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's graph hands the wgrad dy^T as a view of dy (strided along tokens), so routing may
    # give any group size. When the rewrite moves dy's other reader (the dgrad) into a cast
    # kernel, Inductor must still not materialise dy^T contiguous for the wgrad left in bf16
    # (the cost model or Config.gemms keeps it): found on an H100 as a device-side assert.
    from torch._inductor import select_algorithm

    seen: list[list[int]] = []
    monkeypatch.setattr(select_algorithm.extern_kernels, "_grouped_mm",
                        _cuda_checked_grouped_mm(select_algorithm.extern_kernels._grouped_mm, seen))
    torch.manual_seed(0)
    model, (x,) = build(MoEConfig(layers=1, dim=256, heads=2, experts=8, top_k=1, expert_hidden=128,
                                  shared_hidden=0), seq=512)
    x = x.requires_grad_()
    config = Config(target="sm90", cost_model=False, gemms=("forward", "dgrad"))
    torch.compile(model, backend=mxfp8_compile.backend(config))(x).float().pow(2).mean().backward()
    report = mxfp8_compile.last_report()
    assert {e.site.role.value for e in report.entries if e.converted} == {"forward", "dgrad"}
    assert seen and any(s % 8 for sizes in seen for s in sizes)  # unaligned groups reached the kept wgrads


def _example_moe() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return build(MoEConfig(layers=1, dim=128, heads=4, expert_hidden=64, experts=4, shared_hidden=0))


def _hf_qwen3_moe() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    from mxfp8_compile.examples.clients import hf_example

    return hf_example("qwen3_moe")


@pytest.mark.usefixtures("pretend_sm90")
@pytest.mark.parametrize("example, gathered_ops", [(_example_moe, 4), (_hf_qwen3_moe, 8)])
def test_gathered_casts_give_the_bits_of_the_permuted_copy(example, gathered_ops: int) -> None:
    # x and the down projection's dy cast through the token permutation, or written out and
    # cast (Config.gathered_casts=False): the same output and gradients, bit for bit. HF's dy
    # is its unsort's backward, a scatter by the inverse permutation (4 casts in each of 2 layers)
    torch.manual_seed(0)
    model, (x,) = example()
    results = []
    for gathered in (True, False):
        graphs: dict[str, torch.fx.GraphModule] = {}
        config = dataclasses.replace(SM90_EVERY_GEMM, gathered_casts=gathered)
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=mxfp8_compile.backend(config, inductor=False, on_graph=graphs.__setitem__))
        out = compiled(x)
        out.float().sum().backward()
        casts = [n for n in graphs["joint"].graph.nodes if n.target in (
            torch.ops.mxfp8.quantize_rebase_gathered.default, torch.ops.mxfp8.quantize_rebase_token_groups_gathered.default)]
        assert len(casts) == (gathered_ops if gathered else 0)
        results.append([out, *(p.grad for p in model.parameters() if p.grad is not None)])
    assert len(results[0]) > 10
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
