"""GEMMs the plugin cannot convert stay in high precision, with the reason, and stay correct."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mxfp8_compile
from mxfp8_compile import Config
from mxfp8_compile import numerics
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes.report import Role, SkipReason

BF16 = torch.bfloat16


class Experts(nn.Module):
    def __init__(self, experts: int, n: int, k: int, dtype: torch.dtype = BF16) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, n, k, dtype=dtype) / k**0.5)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


def _train(module: nn.Module, *inputs: torch.Tensor, config: Config | None = None):
    compiled = torch.compile(module, backend=mxfp8_compile.backend(config, inductor=False))
    x = inputs[0].clone().requires_grad_()
    out = compiled(x, *inputs[1:])
    (out.float() ** 2).sum().backward()
    return out, x.grad, mxfp8_compile.last_report()


def _reasons(report: mxfp8_compile.PassReport) -> dict[Role, SkipReason | None]:
    return {e.site.role: (None if e.converted else e.decision.reason) for e in report.entries}


OFFS = torch.tensor([10, 10, 64], dtype=torch.int32)


def _mx(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` zero-padded along ``dim`` to a multiple of 32 and MX-rounded there."""
    padded = numerics.pad_to_block(x, dim)
    return numerics.from_mx(*numerics.to_mx(padded, dim=dim), dim=dim, dtype=padded.dtype)


def test_k_not_a_multiple_of_32_is_zero_padded() -> None:
    module, x = Experts(3, 64, 48), torch.randn(64, 48, dtype=BF16)
    out, _, report = _train(module, x, OFFS)
    assert _reasons(report) == {Role.FORWARD: None, Role.DGRAD: None, Role.WGRAD: None}
    (forward,) = [e.decision for e in report.entries if e.site.role is Role.FORWARD]
    assert str(forward) == "converted (contraction 48 (not a multiple of 32) zero-padded to a multiple of 32)"
    # exactly the GEMM of the zero-padded operands, MX-rounded along K
    expected = torch._grouped_mm(_mx(x, -1), _mx(module.w.detach(), -1).transpose(-2, -1), offs=OFFS)
    assert torch.equal(out, expected)


def test_n_not_a_multiple_of_32_pads_the_dgrad() -> None:
    module, x = Experts(3, 40, 64), torch.randn(64, 64, dtype=BF16)
    out, grad, report = _train(module, x, OFFS)
    assert _reasons(report) == {Role.FORWARD: None, Role.DGRAD: None, Role.WGRAD: None}
    x_ref = x.clone().requires_grad_()
    ref = module(x_ref, OFFS)
    (ref.float() ** 2).sum().backward()
    assert sqnr(ref, out) >= 27 and sqnr(x_ref.grad, grad) >= 24


def test_operand_dtype_the_config_does_not_allow() -> None:
    linear = nn.Linear(64, 64, bias=True)  # fp32
    x = torch.randn(32, 64)
    out, grad, report = _train(linear, x, config=Config(operand_dtypes=("bfloat16",)))
    assert {d.reason for _, d in report.skipped()} == {SkipReason.DTYPE} and not report.converted()
    assert "A is torch.float32; allowed: ('bfloat16',)" in str(report.skipped()[0][1])
    torch.testing.assert_close(out, linear(x), rtol=1e-6, atol=1e-6)
    # with the default config fp32 operands are quantized too (from fp32, no bf16 round trip)
    _, _, report = _train(linear, x)
    assert len(report.converted()) == 3


def test_3d_x_3d_grouped_mm_has_no_mx_path() -> None:
    def bmm_like(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(a, b)

    a, b = torch.randn(4, 32, 64, dtype=BF16), torch.randn(4, 64, 32, dtype=BF16)
    out = torch.compile(bmm_like, backend=mxfp8_compile.backend(inductor=False))(a, b)
    (site, decision), = mxfp8_compile.last_report().skipped()
    assert decision.reason is SkipReason.UNSUPPORTED_LAYOUT and "3Dx3D" in str(decision)
    assert torch.equal(out, torch._grouped_mm(a, b))


def test_addmm_with_beta_and_alpha_stays_exact() -> None:
    # A scaled bias or product has no MX path: the GEMM stays as it was, to the bit.
    def scaled(bias: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias, x, w, beta=0.5, alpha=2.0)

    args = (torch.randn(64, dtype=BF16), torch.randn(32, 64, dtype=BF16), torch.randn(64, 64, dtype=BF16))
    out = torch.compile(scaled, backend=mxfp8_compile.backend(inductor=False))(*args)
    (site, decision), = mxfp8_compile.last_report().skipped()
    assert decision.reason is SkipReason.UNSUPPORTED_ARGS and "beta=0.5, alpha=2.0" in str(decision)
    assert torch.equal(out, scaled(*args))


def test_graph_without_gemms_is_left_alone() -> None:
    graphs = {}

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * 2).cumsum(0)

    x = torch.randn(16, 8)
    out = torch.compile(f, backend=mxfp8_compile.backend(inductor=False, on_graph=graphs.__setitem__))(x)
    report = mxfp8_compile.last_report()
    assert report.entries == [] and report.target == "none"
    assert not any("mxfp8" in str(n.target) for n in graphs["inference"].graph.nodes)
    assert torch.equal(out, f(x))


@pytest.mark.parametrize(
    "target,message",
    [("sm90", r"Config\(target='sm90'\) needs an SM90 GPU"), ("sm100", r"Config\(target='sm100'\) needs an SM100 GPU")],
)
def test_a_target_this_device_cannot_run_is_a_clear_error(target: str, message: str) -> None:
    module, x = Experts(3, 64, 64), torch.randn(64, 64, dtype=BF16)
    with pytest.raises(Exception, match=message):
        _train(module, x, OFFS, config=Config(target=target))
