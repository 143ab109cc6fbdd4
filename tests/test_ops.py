"""The ``mxfp8::`` ops: opcheck, the emulated GEMMs against float64, SQNR bars, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from mxfp8_compile import numerics
from mxfp8_compile import ops
from mxfp8_compile.numerics import from_mx, sqnr

BF16 = torch.bfloat16


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)


SIZES = [0, 1, 31, 33, 64, 7, 0, 120]  # ragged, empty and 1-token groups; total 256
M, K, N, E = sum(SIZES), 128, 96, len(SIZES)


@pytest.fixture
def moe() -> dict[str, torch.Tensor]:
    """Activations, expert weights (E, N, K) as nn.Linear stores them, and a grad_out."""
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(M, K, generator=g).to(BF16),
        "w": (torch.randn(E, N, K, generator=g) / K**0.5).to(BF16),
        "dy": torch.randn(M, N, generator=g).to(BF16),
        "offs": _offsets(SIZES),
    }


def _all_op_calls(moe: dict[str, torch.Tensor]) -> list[tuple[object, tuple, dict]]:
    x, w, dy, offs = moe["x"], moe["w"], moe["dy"], moe["offs"]
    q, s = ops.quantize(x)
    qw, sw = ops.quantize(w.transpose(-2, -1), dim=-2)  # B (E, K, N) along K
    qt, st, po = ops.quantize_token_groups(x, offs)
    qd, sd, _ = ops.quantize_token_groups(dy, offs)
    f32 = numerics.e8m0_to_fp32  # the rowwise GEMMs take the scale bytes decoded
    ra, rsa = ops.rebase_rowwise(q, s, -1)
    rsa = f32(rsa)
    return [
        (ops.quantize, (x,), {}),
        (ops.pad_to_block, (x[:, :40], -1), {}),
        (ops.pad_to_block, (w.transpose(-2, -1)[:, :50], 1), {}),
        (ops.quantize, (w.float(),), {"dim": 1, "mode": "floor"}),
        (ops.quantize_token_groups, (x, offs), {"mode": "floor"}),
        (ops.quantize_token_groups_transposed, (dy, offs), {}),
        (ops.dequantize, (q, s, -1, torch.float32), {}),
        (ops.quantize_mxint8, (w,), {"dim": 1}),
        (ops.quantize_square, (w,), {"mode": "floor"}),
        (ops.square_tile_scales, (w,), {"mode": "floor"}),
        (ops.quantize_rebase_square, (w.transpose(-2, -1), ops.square_tile_scales(w).mT), {}),
        (ops.dequantize_mxint8, (*ops.quantize_mxint8(x), -1, BF16), {}),
        (ops.to_blocked, (s,), {}),
        (ops.to_blocked, (sw.transpose(-2, -1).contiguous(),), {}),
        (ops.to_blocked_m_groups, (s, offs), {}),
        (ops.to_blocked_k_groups, (st.t().contiguous(), po), {}),
        (ops.rebase_rowwise, (q, s, -1), {}),
        (ops.quantize_rebase, (w.transpose(-2, -1),), {"mode": "floor"}),
        (ops.rebase_rowwise, (qw, sw, -2), {}),
        (ops.rebase_token_groups, (qt, st, po), {}),
        (ops.quantize_rebase_token_groups, (dy[:, :64].t(), offs[:2]), {"mode": "floor"}),
        (ops.quantize_rows_and_token_groups, (x, offs), {"mode": "floor"}),
        (ops.quantize_rebase_gathered, (x, torch.arange(x.shape[0] - 1, -1, -1), None), {}),
        (ops.quantize_rebase_token_groups_gathered, (x.half(), torch.arange(x.shape[0]) // 3, dy[:, 1], offs), {}),
        (ops.quantize_rows_and_token_groups_gathered,
         (x.float(), torch.arange(x.shape[0], dtype=torch.int32) // 2, dy[:, 0].float(), offs), {"mode": "floor"}),
        (ops.scaled_grouped_mm, (q, s, qw, sw, offs, BF16), {}),
        (ops.scaled_grouped_mm, (qd.t(), sd.t(), qt, st, po, torch.float32), {}),
        (ops.scaled_mm, (q, s, qw[0], sw[0], BF16), {}),
        (ops.scaled_grouped_mm_rowwise, (ra, rsa, qw, f32(sw[:, 0]), offs, BF16, False), {}),
        (ops.scaled_grouped_mm_rowwise, (qd.t(), f32(sd[:8]), qt, f32(st[:8]), po, BF16, True), {}),
        (ops.scaled_mm_rowwise, (ra, rsa, qw[0], f32(sw[0, 0]), torch.float32, False), {}),
        # more cases of the two below: tests/test_sm100.py
        (ops.scaled_grouped_mm_blocked, (q, ops.to_blocked_m_groups(s, offs), qw, ops.to_blocked(sw.mT), offs, BF16), {}),
        (ops.scaled_mm_blocked, (q, ops.to_blocked(s), qw[0], ops.to_blocked(sw[0].t()), BF16), {}),
    ]


@pytest.mark.usefixtures("fp8_aware_allclose")
def test_every_op_passes_opcheck(moe: dict[str, torch.Tensor]) -> None:
    checked = set()
    for op, args, kwargs in _all_op_calls(moe):
        opcheck(op, args, kwargs)  # raises OpCheckError on any failing check
        checked.add(op._qualname)
    registered = {name for name in dir(torch.ops.mxfp8) if isinstance(getattr(torch.ops.mxfp8, name), torch._ops.OpOverloadPacket)}
    assert checked == {f"mxfp8::{name}" for name in registered}


# --------------------------------------------------------------------------------------------
# Emulated GEMMs against float64 per-group loops.
# --------------------------------------------------------------------------------------------


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _bf16_rounding_error(ref: torch.Tensor) -> float:
    return _relative_error(ref.to(BF16), ref)


def test_scaled_grouped_mm_2d3d_against_float64_loop(moe: dict[str, torch.Tensor]) -> None:
    q, s = ops.quantize(moe["x"])
    qw, sw = ops.quantize(moe["w"].transpose(-2, -1), dim=-2)
    out = ops.scaled_grouped_mm(q, s, qw, sw, moe["offs"], BF16)
    a = from_mx(q, s, dtype=torch.float64)
    b = from_mx(qw, sw, dim=-2, dtype=torch.float64)
    ref = torch.zeros(M, N, dtype=torch.float64)
    start = 0
    for g, end in enumerate(moe["offs"].tolist()):
        ref[start:end] = a[start:end] @ b[g]
        start = end
    assert out.dtype == BF16 and out.shape == (M, N)
    # Only the bf16 rounding of the output: at most 1.5x what rounding the exact result gives.
    assert _relative_error(out, ref) <= 1.5 * _bf16_rounding_error(ref)


def test_scaled_grouped_mm_2d2d_against_float64_loop(moe: dict[str, torch.Tensor]) -> None:
    qd, sd, po = ops.quantize_token_groups(moe["dy"], moe["offs"])
    qx, sx, _ = ops.quantize_token_groups(moe["x"], moe["offs"])
    out = ops.scaled_grouped_mm(qd.t(), sd.t(), qx, sx, po, BF16)
    a = from_mx(qd, sd, dim=0, dtype=torch.float64).t()
    b = from_mx(qx, sx, dim=0, dtype=torch.float64)
    ref = torch.zeros(E, N, K, dtype=torch.float64)
    start = 0
    for g, end in enumerate(po.tolist()):
        ref[g] = a[:, start:end] @ b[start:end]
        start = end
    assert out.shape == (E, N, K)
    assert not out[0].any() and not out[6].any()  # empty groups give zero gradients
    assert _relative_error(out, ref) <= 1.5 * _bf16_rounding_error(ref)


def test_scaled_mm_against_float64(moe: dict[str, torch.Tensor]) -> None:
    q, s = ops.quantize(moe["x"])
    qb, sb = ops.quantize(moe["w"][2].t(), dim=-2)  # (K, N) along K
    ref = from_mx(q, s, dtype=torch.float64) @ from_mx(qb, sb, dim=-2, dtype=torch.float64)
    out = ops.scaled_mm(q, s, qb, sb, BF16)
    assert _relative_error(out, ref) <= 1.5 * _bf16_rounding_error(ref)
    # an fp32 result is computed in fp32, not rounded through bf16
    out = ops.scaled_mm(q, s, qb, sb, torch.float32)
    assert out.dtype == torch.float32 and _relative_error(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------
# The whole quantize -> GEMM path against the bf16 GEMM: DESIGN section 5's op-level bars.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_quantized_path_sqnr_against_bf16(moe: dict[str, torch.Tensor], mode: str) -> None:
    x, w, dy, offs = moe["x"], moe["w"], moe["dy"], moe["offs"]
    # forward: x (M, K) @ w^T (E, K, N), both along K
    q, s = ops.quantize(x, mode=mode)
    qw, sw = ops.quantize(w.transpose(-2, -1), dim=-2, mode=mode)
    fwd = ops.scaled_grouped_mm(q, s, qw, sw, offs, BF16)
    assert sqnr(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs), fwd) >= 27
    # dgrad: dy (M, N) @ w (E, N, K), both along N
    qg, sg = ops.quantize(dy, mode=mode)
    qwn, swn = ops.quantize(w, dim=-2, mode=mode)
    dgrad = ops.scaled_grouped_mm(qg, sg, qwn, swn, offs, BF16)
    assert sqnr(torch._grouped_mm(dy, w, offs=offs), dgrad) >= 25
    # wgrad: dy^T (N, M) @ x (M, K) per group, both along tokens
    qd, sd, po = ops.quantize_token_groups(dy, offs, mode=mode)
    qx, sx, _ = ops.quantize_token_groups(x, offs, mode=mode)
    wgrad = ops.scaled_grouped_mm(qd.t(), sd.t(), qx, sx, po, BF16)
    assert sqnr(torch._grouped_mm(dy.t(), x, offs=offs), wgrad) >= 24
    # dense linear
    qb, sb = ops.quantize(w[0].t(), dim=-2, mode=mode)
    assert sqnr(x @ w[0].t(), ops.scaled_mm(q, s, qb, sb, BF16)) >= 27


# --------------------------------------------------------------------------------------------
# Layouts: non-contiguous inputs work and give the same bits.
# --------------------------------------------------------------------------------------------


def test_non_contiguous_operands_give_the_same_result(moe: dict[str, torch.Tensor]) -> None:
    w_t = moe["w"].transpose(-2, -1)  # (E, K, N), strides (N*K, 1, K): how models pass it
    assert not w_t.is_contiguous()
    qw, sw = ops.quantize(w_t, dim=-2)
    qc, sc = ops.quantize(w_t.contiguous(), dim=-2)
    assert torch.equal(qw.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sw, sc)
    q, s = ops.quantize(moe["x"])
    # the same B data as a column-major view and as a contiguous tensor
    qb_view = qw.view(torch.uint8).transpose(-2, -1).contiguous().view(torch.float8_e4m3fn).transpose(-2, -1)
    a = ops.scaled_grouped_mm(q, s, qb_view, sw, moe["offs"], BF16)
    b = ops.scaled_grouped_mm(q, s, qw, sw, moe["offs"], BF16)
    assert torch.equal(a, b)


def test_ops_compile_with_inductor_on_cpu(moe: dict[str, torch.Tensor]) -> None:
    def layer(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        q, s = ops.quantize(x.relu())
        qw, sw = ops.quantize(w.transpose(-2, -1), dim=-2)
        return ops.scaled_grouped_mm(q, s, qw, sw, offs, BF16)

    args = (moe["x"], moe["w"], moe["offs"])
    assert torch.equal(torch.compile(layer, fullgraph=True)(*args), layer(*args))


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the tensor, its shape or dtype, and the rule.
# --------------------------------------------------------------------------------------------


def test_bad_quantize_inputs() -> None:
    with pytest.raises(ValueError, match=r"x of shape \(4, 48\).*48 is not a multiple of the MX block size 32"):
        ops.quantize(torch.randn(4, 48))
    with pytest.raises(ValueError, match=r"along dim 0: its size 40"):
        ops.quantize(torch.randn(40, 64), dim=0)
    with pytest.raises(TypeError, match=r"x must be bfloat16, float16 or float32.*got torch.int32"):
        ops.quantize(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"got torch.float8_e4m3fn"):
        ops.quantize(torch.zeros(4, 32).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"unknown scale mode 'even'; allowed: 'rceil', 'floor'"):
        ops.quantize(torch.randn(4, 32), mode="even")


def test_bad_offsets() -> None:
    x = torch.randn(64, 32)
    with pytest.raises(TypeError, match=r"offs must be int32 group end offsets, got torch.int64"):
        ops.quantize_token_groups(x, torch.tensor([32, 64]))
    with pytest.raises(ValueError, match=r"offs must be 1D .* got shape \(1, 2\)"):
        ops.quantize_token_groups(x, torch.tensor([[32, 64]], dtype=torch.int32))


def test_bad_gemm_operands(moe: dict[str, torch.Tensor]) -> None:
    q, s = ops.quantize(moe["x"])
    qw, sw = ops.quantize(moe["w"].transpose(-2, -1), dim=-2)
    offs = moe["offs"]
    with pytest.raises(ValueError, match=r"B scales have shape \(8, 96, 4\), expected \(8, 4, 96\)"):
        ops.scaled_grouped_mm(q, s, qw, sw.transpose(-2, -1).contiguous(), offs, BF16)
    with pytest.raises(ValueError, match=r"A scales have shape \(256, 2\), expected \(256, 4\)"):
        ops.scaled_grouped_mm(q, s[:, :2], qw, sw, offs, BF16)
    with pytest.raises(TypeError, match=r"A scales must be uint8 E8M0 bytes.*view float8_e8m0fnu scales as torch.uint8"):
        ops.scaled_grouped_mm(q, s.view(torch.float8_e8m0fnu), qw, sw, offs, BF16)
    with pytest.raises(TypeError, match=r"B data must be float8_e4m3fn, got torch.bfloat16"):
        ops.scaled_grouped_mm(q, s, moe["w"].transpose(-2, -1), sw, offs, BF16)
    with pytest.raises(ValueError, match=r"offs has 3 groups but B of shape \(8, 128, 96\) has 8 experts"):
        ops.scaled_grouped_mm(q, s, qw, sw, offs[:3], BF16)
    with pytest.raises(ValueError, match=r"contraction dims differ"):
        ops.scaled_mm(q, s, qw[0][:64], sw[0][:2], BF16)
