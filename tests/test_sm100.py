"""The sm100 target by contract: no SM100 GPU runs these tests.

Three checks stand in for the hardware: the blocked-scale ops' emulation gives the same bits as
the emulated MX GEMMs; their CUDA kernels, run on fake CUDA tensors, pass torch's own meta
checks of ``_scaled_grouped_mm`` / ``_scaled_mm`` (shapes, dtypes, strides, alignment and the
e8m0 blocked scale shapes); and the whole model compiles for sm100 (the capability check
monkeypatched, as test_sm90.py does) with every expert GEMM on the blocked-scale ops.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import mxfp8_compile
from mxfp8_compile import Config, numerics, ops
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.lowering import targets

BF16, E4M3, U8 = torch.bfloat16, torch.float8_e4m3fn, torch.uint8
SM100 = (10, 0)
# Ragged token groups: empty ones, and sizes that are multiples of neither 32 nor 128.
SIZES = [0, 1, 31, 33, 130, 0, 7, 60]
M, K, N, E = sum(SIZES), 128, 96, len(SIZES)


def _pretend(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(targets, "device_capability", lambda device: capability)


@pytest.fixture
def moe() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(M, K, generator=g).to(BF16),
        "w": (torch.randn(E, N, K, generator=g) / K**0.5).to(BF16),  # as nn.Linear stores it
        "dy": torch.randn(M, N, generator=g).to(BF16),
        "offs": torch.tensor(SIZES, dtype=torch.int32).cumsum(0, dtype=torch.int32),
    }


def _mx_and_blocked_calls(moe: dict[str, torch.Tensor]) -> dict[str, tuple[tuple, tuple]]:
    """Per GEMM role: the emulated MX GEMM's arguments and the blocked one's, as the sm100
    rewrite builds them (B quantized through its transpose, scales through the to_blocked ops)."""
    x, w, dy, offs = moe["x"], moe["w"], moe["dy"], moe["offs"]
    calls = {}
    for role, a, b_t in (("forward", x, w), ("dgrad", dy, w.transpose(-2, -1))):
        qa, sa = ops.quantize(a)
        qbt, sbt = ops.quantize(b_t.contiguous())  # B^T (E, N_out, C) along the contraction C
        mx = (qa, sa, qbt.mT, sbt.mT, offs)
        blocked = (qa, ops.to_blocked_m_groups(sa, offs), qbt.mT, ops.to_blocked(sbt), offs)
        calls[role] = (mx, blocked)
    qd, sd, po = ops.quantize_token_groups(dy, offs)
    qx, sx, _ = ops.quantize_token_groups(x, offs)
    qdt, sdt, _ = ops.quantize_token_groups_transposed(dy, offs)  # (N, Mp): A as the GEMM reads it
    qxt, sxt, _ = ops.quantize_token_groups_transposed(x, offs)  # (K, Mp): B^T
    calls["wgrad"] = (
        (qd.t(), sd.t(), qx, sx, po),
        (qdt, ops.to_blocked_k_groups(sdt, po), qxt.t(), ops.to_blocked_k_groups(sxt, po), po),
    )
    qa, sa = ops.quantize(x)
    qbt, sbt = ops.quantize(w[2])
    calls["dense"] = ((qa, sa, qbt.t(), sbt.t()), (qa, ops.to_blocked(sa), qbt.t(), ops.to_blocked(sbt)))
    return calls


def _gemms(role: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    if role == "dense":
        return ops.scaled_mm, ops.scaled_mm_blocked
    return ops.scaled_grouped_mm, ops.scaled_grouped_mm_blocked


# --------------------------------------------------------------------------------------------
# The ops: opcheck and the emulation, bit for bit.
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fp8_aware_allclose")
@pytest.mark.parametrize("role", ["forward", "wgrad", "dense"])
def test_blocked_ops_pass_opcheck(moe: dict[str, torch.Tensor], role: str) -> None:
    _, blocked = _mx_and_blocked_calls(moe)[role]
    for out_dtype in (BF16, torch.float32):
        opcheck(_gemms(role)[1], (*blocked, out_dtype))


@pytest.mark.parametrize("role", ["forward", "dgrad", "wgrad", "dense"])
def test_emulation_gives_the_bits_of_the_mx_gemms(moe: dict[str, torch.Tensor], role: str) -> None:
    mx_args, blocked_args = _mx_and_blocked_calls(moe)[role]
    mx_gemm, blocked_gemm = _gemms(role)
    expected = mx_gemm(*mx_args, BF16)
    assert torch.equal(blocked_gemm(*blocked_args, BF16).view(torch.int16), expected.view(torch.int16))
    # other output dtypes: the bf16 product, cast (torch's MX grouped GEMM outputs bf16 only)
    assert torch.equal(blocked_gemm(*blocked_args, torch.float32), expected.float())
    if role == "wgrad":
        assert not expected[0].any() and not expected[5].any()  # empty groups: zero gradients


def test_blocked_scales_of_the_wrong_layout_are_named(moe: dict[str, torch.Tensor]) -> None:
    (_, _, qb, sb, offs), (qa, sa_blocked, _, sb_blocked, _) = _mx_and_blocked_calls(moe)["forward"]
    global_layout = ops.to_blocked(ops.quantize(moe["x"])[1])  # one matrix, not per token group
    with pytest.raises(ValueError, match=r"A blocked scales have shape \(384, 4\), expected \(1152, 4\).*"
                                         r"mxfp8.to_blocked_m_groups \(A of 2Dx3D\)"):
        ops.scaled_grouped_mm_blocked(qa, global_layout, qb, sb_blocked, offs, BF16)
    with pytest.raises(TypeError, match=r"B blocked scales must be uint8 E8M0 bytes, got torch.float8_e8m0fnu"):
        ops.scaled_grouped_mm_blocked(qa, sa_blocked, qb, sb_blocked.view(torch.float8_e8m0fnu), offs, BF16)
    with pytest.raises(ValueError, match=r"B blocked scales have shape \(8, 4, 96\), expected \(8, 128, 4\)"):
        ops.scaled_grouped_mm_blocked(qa, sa_blocked, qb, sb, offs, BF16)


# --------------------------------------------------------------------------------------------
# The CUDA kernels on fake CUDA tensors: torch's meta functions check what they pass.
# --------------------------------------------------------------------------------------------


def _fake_cuda(t: torch.Tensor) -> torch.Tensor:
    """A fake CUDA tensor with ``t``'s shape, strides and dtype (call under FakeTensorMode)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


@pytest.mark.parametrize("role", ["forward", "dgrad", "wgrad", "dense"])
def test_cuda_kernels_pass_torch_meta_checks(
    moe: dict[str, torch.Tensor], role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend(monkeypatch, SM100)
    _, (qa, sa, qb, sb, *offs) = _mx_and_blocked_calls(moe)[role]
    kernel = ops._scaled_mm_blocked_cuda if role == "dense" else ops._scaled_grouped_mm_blocked_cuda
    # torch's MX GEMMs take A row-major and B column-major; the casts write them so (the wgrad's
    # both tokens contiguous), and the kernel would copy anything else. The operands are passed
    # as they are: a CPU-only torch cannot copy fake CUDA tensors, so a copy would fail here too.
    assert qa.stride(-1) == 1 and qb.stride(-2) == 1, (qa.stride(), qb.stride())
    # Ragged token groups here: padding them runs index ops a CPU-only torch cannot run on fake
    # CUDA tensors (the padded call is the next test's).
    ragged = () if role == "dense" else (True,)
    with FakeTensorMode():
        args = [_fake_cuda(t) for t in (qa, sa, qb, sb, *offs)]
        for out_dtype in (BF16, torch.float32):
            out = kernel(*args, out_dtype, *ragged)
            expected = (E, N, K) if role == "wgrad" else (qa.shape[0], qb.shape[-1])
            assert out.device.type == "cuda" and out.dtype == out_dtype and out.shape == expected


@pytest.mark.parametrize("role", ["forward", "dgrad"])
def test_padded_token_groups_pass_torch_meta_checks(moe: dict[str, torch.Tensor], role: str) -> None:
    # What the kernel hands torch for 2Dx3D unless Config.sm100_ragged_groups: A's rows padded
    # per group to 32, the padded offsets, and the blocked scales as they are. torch's C++ also
    # requires as many A scale rows as A rows (its meta function does not check it).
    _, (qa, sa, qb, sb, offs) = _mx_and_blocked_calls(moe)[role]
    padded_qa, padded_offs = ops._padded_rows(qa, offs)
    assert padded_qa.shape == (numerics.padded_rows_bound(M, E, 32), qa.shape[1]) and sa.shape[0] >= padded_qa.shape[0]
    e8m0 = torch.float8_e8m0fnu
    with FakeTensorMode():
        qa, sa, qb, sb, offs = (_fake_cuda(t) for t in (padded_qa, sa, qb, sb, padded_offs))
        out = torch._scaled_grouped_mm(qa, qb, sa.view(e8m0), sb.reshape(E, -1).view(e8m0), offs=offs, out_dtype=BF16)
    assert out.shape == (padded_qa.shape[0], qb.shape[-1])


def test_padded_groups_have_the_blocked_scales_of_ragged_ones(moe: dict[str, torch.Tensor]) -> None:
    # The padded mode passes the scales blocked for the ragged groups: they must be the bytes
    # that blocking the padded rows' scales on the padded offsets gives (beyond, only zeros).
    _, sa = ops.quantize(moe["x"])
    padded_sa, padded_offs = numerics.pad_token_groups(sa, moe["offs"])
    ragged = numerics.to_blocked_m_groups(sa, moe["offs"])
    padded = numerics.to_blocked_m_groups(padded_sa, padded_offs)
    assert torch.equal(padded[: ragged.shape[0]], ragged) and not padded[ragged.shape[0]:].any()


@pytest.mark.parametrize("role", ["forward", "dgrad"])
def test_padded_and_ragged_groups_give_the_same_bits(moe: dict[str, torch.Tensor], role: str) -> None:
    _, args = _mx_and_blocked_calls(moe)[role]
    padded, ragged = (ops.scaled_grouped_mm_blocked(*args, BF16, r) for r in (False, True))
    assert torch.equal(padded.view(torch.int16), ragged.view(torch.int16))


def test_torch_meta_rejects_what_the_kernel_must_not_pass(moe: dict[str, torch.Tensor]) -> None:
    # The negative control: the meta checks do look at the layouts and the e8m0 scale shapes.
    _, (qa, sa, qb, sb, offs) = _mx_and_blocked_calls(moe)["forward"]
    e8m0, qb_row_major = torch.float8_e8m0fnu, qb.contiguous()
    with FakeTensorMode():
        qa, sa, qb_row_major, qb, sb, offs = (_fake_cuda(t) for t in (qa, sa, qb_row_major, qb, sb, offs))
        scale_a, scale_b = sa.view(e8m0), sb.reshape(E, -1).view(e8m0)
        with pytest.raises(RuntimeError, match=r"For MXFP8, 3d tensor should have 2d scales"):
            torch._scaled_grouped_mm(qa, qb, scale_a, sb.view(e8m0), offs=offs, out_dtype=BF16)
        with pytest.raises(RuntimeError, match=r"Expected mat_b tensor to be column major"):
            torch._scaled_grouped_mm(qa, qb_row_major, scale_a, scale_b, offs=offs, out_dtype=BF16)
        with pytest.raises(RuntimeError, match=r"to have scale shape of \(8,512\.?0?\), but got"):
            torch._scaled_grouped_mm(qa, qb, scale_a, scale_b.narrow(1, 0, 500), offs=offs, out_dtype=BF16)


@pytest.mark.parametrize("capability", [(9, 0), (10, 1), (12, 0), None])
def test_cuda_kernel_refuses_below_sm100(
    moe: dict[str, torch.Tensor], capability: tuple[int, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend(monkeypatch, capability)
    _, (qa, sa, qb, sb, offs) = _mx_and_blocked_calls(moe)["forward"]
    message = (
        r"the MX GEMMs of target 'sm100' need a GPU torch builds MX kernels for \(B200, GB200, B300: compute "
        rf"capability 10.0, 10.3\), but cuda:0 has capability {re.escape(str(capability))}; torch's MX kernels would kill"
    )
    with pytest.raises(RuntimeError, match=message):
        ops._require_mx_gemm_device(torch.device("cuda", 0))
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        ops._scaled_grouped_mm_blocked_cuda(*(_fake_cuda(t) for t in (qa, sa, qb, sb, offs)), BF16)


@pytest.mark.gpu
def test_blocked_gemm_refuses_to_launch_on_a_gpu_below_sm100(moe: dict[str, torch.Tensor]) -> None:
    device = torch.device("cuda")
    if targets.has_mx_gemm(targets.device_capability(device)):
        pytest.skip("an SM100 GPU: the MX kernel would launch")
    _, args = _mx_and_blocked_calls(moe)["forward"]
    with pytest.raises(RuntimeError, match=r"the MX GEMMs of target 'sm100' need a GPU torch builds MX kernels for"):
        ops.scaled_grouped_mm_blocked(*(t.to(device) for t in args), BF16)
    torch.cuda.synchronize()  # the CUDA context is alive: nothing was launched


# --------------------------------------------------------------------------------------------
# Target choice and the whole model.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def selftest_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MXFP8_COMPILE_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.usefixtures("selftest_records")
@pytest.mark.parametrize("capability,expected,why", [
    ((10, 0), "sm100", r"auto: cuda:0 has capability \(10, 0\)"),
    ((10, 3), "emulated", r"not sm100: capability \(10, 3\): torch 2.11 has MX kernels for it, unproven until "
                          r"`python -m mxfp8_compile --selftest` passes on this GPU \(not run for padded token groups\)"),
    ((10, 1), "emulated", r"not sm100: capability \(10, 1\): torch's MX GEMMs run on 10.0 and 10.3 only"),
    ((9, 0), "sm90", r"auto: cuda:0 has capability \(9, 0\)"),
    ((12, 0), "emulated", r"not sm90: capability \(12, 0\): torch's rowwise FP8 grouped GEMM is SM90 code"),
])
def test_auto_picks_sm100_where_torch_has_proven_mx_kernels(
    capability: tuple[int, int], expected: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend(monkeypatch, capability)
    choice = targets.choose_target(Config(), torch.device("cuda", 0))
    assert choice.target == expected and re.search(why, choice.why), choice


def test_an_unproven_capability_takes_sm100_once_the_selftest_passed_its_mode(
    selftest_records: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend(monkeypatch, (10, 3))
    cuda, ragged = torch.device("cuda", 0), Config(sm100_ragged_groups=True)
    path = targets.write_selftest_record((10, 3), {"padded": True, "ragged": False})
    assert path.parent == selftest_records
    assert targets.select_target(Config(), cuda) == "sm100"
    assert "(it failed for ragged token groups); not sm90" in targets.choose_target(ragged, cuda).why
    with pytest.raises(ValueError, match=r"\(capability \(10, 3\)\): capability \(10, 3\): torch 2.11 has MX kernels"):
        targets.select_target(dataclasses.replace(ragged, target="sm100"), cuda)


def test_forcing_sm100_below_sm100_names_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    needs = (r"Config\(target='sm100'\) needs an SM100 GPU \(B200, GB200: compute capability 10.0; B300, 10.3, "
             r"after the self-check\)")
    with pytest.raises(ValueError, match=needs + r"; this graph's GEMMs run on cpu: no CUDA device. Use target='auto'"):
        targets.select_target(Config(target="sm100"), torch.device("cpu"))
    _pretend(monkeypatch, (9, 0))
    with pytest.raises(ValueError, match=needs + r"; this graph's GEMMs run on cuda:0 \(capability \(9, 0\)\): "
                                              r"capability \(9, 0\): torch's MX GEMMs run on 10.0 and 10.3 only"):
        targets.select_target(Config(target="sm100"), torch.device("cuda", 0))


def _train(model: torch.nn.Module, x: torch.Tensor, backend: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = copy.deepcopy(model)
    x = x.detach().clone().requires_grad_()
    out = torch.compile(model, backend=backend)(x)
    F.mse_loss(out.float(), torch.ones(out.shape)).backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters())]


def test_sm100_rewrite_of_the_moe_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # The graph is on CPU, so the blocked ops run their emulation: the same bits as 'emulated'.
    _pretend(monkeypatch, SM100)
    model, (x,) = build(MoEConfig(layers=1))
    graphs: dict[str, torch.fx.GraphModule] = {}
    sm100 = mxfp8_compile.backend(Config(), inductor=False, on_graph=graphs.__setitem__)
    out, grads = _train(model, x, sm100)

    report = mxfp8_compile.last_report()
    experts = [e for e in report.entries if e.site.fqn.endswith("moe.experts")]
    assert report.target == "sm100" and len(report.converted()) == 30
    assert len(experts) == 9 and all(e.converted for e in experts)
    nodes = [str(n.target) for kind in ("forward", "backward") for n in graphs[kind].graph.nodes]
    # 3 expert GEMMs x (forward, dgrad, wgrad); 7 dense linears x 3 roles
    assert nodes.count("mxfp8.scaled_grouped_mm_blocked.default") == 9
    assert nodes.count("mxfp8.scaled_mm_blocked.default") == 21
    assert {"mxfp8.to_blocked_m_groups.default", "mxfp8.to_blocked_k_groups.default"} <= set(nodes)
    assert not {"mxfp8.scaled_grouped_mm.default", "mxfp8.scaled_mm.default", "aten._grouped_mm.default"} & set(nodes)
    # x (gate and up projections), h and the three dy: each cast along K and along tokens at once,
    # x and the down projection's dy read through the token permutation that produces them
    assert nodes.count("mxfp8.quantize_rows_and_token_groups.default") == 3
    assert nodes.count("mxfp8.quantize_rows_and_token_groups_gathered.default") == 2
    assert nodes.count("mxfp8.quantize_token_groups.default") == 0
    # every MX GEMM gets its operands in the layouts torch requires, as cast: no fp8 copy first
    for kind in ("forward", "backward"):
        gemm = torch.ops.mxfp8.scaled_grouped_mm_blocked.default
        for node in graphs[kind].graph.find_nodes(op="call_function", target=gemm):
            qa, qb = (arg.meta["val"] for arg in (node.args[0], node.args[2]))
            assert qa.stride(-1) == 1 and qb.stride(-2) == 1, (node.name, qa.stride(), qb.stride())

    emulated_out, emulated_grads = _train(model, x, mxfp8_compile.backend(Config(target="emulated"), inductor=False))
    assert torch.equal(out, emulated_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, emulated_grads, strict=True))
