"""Triton cast kernels, bit-exact against ``mxfp8_compile.numerics``.

``quantize_rebase_rows``: MX-quantize each row of ``x`` in blocks of 32 along its last dim and
rebase the row to its largest block scale (the SM90 path's operand preparation), in one kernel.
Each program owns BLOCK_R rows: a first sweep over K finds every block scale and the row's
largest; a second sweep (re-reading x, mostly from L2) quantizes each block with its own scale
and shifts it to the row's, writing e4m3 once. On the GPU the hardware cast rounds to e4m3
(``cvt.rn.satfinite``); under the Triton interpreter, whose float8 cast does not round to
nearest-even, exact integer arithmetic does (``_round_e4m3``). Both are checked bit for bit
against numerics: the GPU path in test_gpu.py, the integer path in CI.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxfp8_compile.numerics import BLOCK_SIZE, ScaleMode, check_block_dim, check_high_precision

# The interpreter's float8 cast does not round to nearest-even: exact integer rounding there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _block_scales(x, BLOCK_R: tl.constexpr, NUM_BLOCKS: tl.constexpr, RCEIL: tl.constexpr):
    """E8M0 bytes (int32, BLOCK_R x NUM_BLOCKS) of x's 32-wide blocks: numerics.e8m0_rceil of
    amax * fp32(1/448), or numerics.e8m0_floor of amax; 255 for blocks with NaN or Inf."""
    blocks = tl.reshape(x, (BLOCK_R, NUM_BLOCKS, 32))
    amax = tl.max(tl.abs(blocks), axis=2)
    # tl.max may drop NaN (triton#11111): look for it separately.
    has_nan = tl.max((blocks != blocks).to(tl.int32), axis=2) > 0
    if RCEIL:
        bits = (amax * 0.002232142857142857).to(tl.int32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        mantissa = bits & 0x7FFFFF
        round_up = tl.where(exponent == 0, mantissa > 0x400000, mantissa != 0)
        byte = exponent + round_up.to(tl.int32)
    else:
        bits = amax.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        byte = tl.minimum(tl.maximum(exponent - 127 - 8, -127), 128) + 127
    finite = exponent != 0xFF
    return tl.where(finite & ~has_nan, byte, 255)


@triton.jit
def _round_e4m3(v):
    """``v`` (fp32) rounded to nearest-even on the e4m3 grid, saturated to +-448; NaN stays NaN.

    Exact integer arithmetic rather than a float8 cast, so every backend (hardware or the
    interpreter, whose cast does not round to nearest-even) gives the same bits.
    """
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normal range (>= 2**-6): keep 3 of 23 mantissa bits, ties to even, carries into the exponent
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF
    normal = rounded.to(tl.float32, bitcast=True)
    # subnormal range: multiples of 2**-9
    m = a * 512.0
    whole = tl.floor(m)
    frac = m - whole
    odd = (whole.to(tl.int32) & 1) == 1
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    subnormal = (whole + up.to(tl.float32)) * 0.001953125
    r = tl.minimum(tl.where(a >= 0.015625, normal, subnormal), 448.0)
    # The sign goes back as a bit: Triton lowers -r as 0 - r, which turns -0.0 into +0.0.
    sign = v.to(tl.int32, bitcast=True) & -0x80000000
    signed = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, signed)


@triton.jit
def _e4m3_bits(r):
    """The e4m3 byte of an fp32 value already on the e4m3 grid (``_round_e4m3``)."""
    a = tl.abs(r)
    bits = a.to(tl.int32, bitcast=True)
    magnitude = tl.where(a >= 0.015625, (bits >> 20) - ((127 - 7) << 3), (a * 512.0).to(tl.int32))
    sign = (r.to(tl.int32, bitcast=True) >> 24) & 0x80
    return tl.where(r != r, 0x7F, magnitude | sign).to(tl.uint8)


@triton.jit
def _pow2(e):
    """2**e in fp32 for int32 e <= 127; 0 below the fp32 normal range (-126)."""
    return tl.where(e >= -126, ((e + 127) << 23).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _quantize_rebase_rows_kernel(
    x_ptr, out_ptr, scale_ptr,  # x (B, R, K) any strides; out (B, R, K) e4m3 bytes (u8) contiguous; scale (B, R) u8
    R, K,
    stride_xb, stride_xr, stride_xk,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, RCEIL: tl.constexpr, HW_CAST: tl.constexpr,
):
    NUM_BLOCKS: tl.constexpr = BLOCK_K // 32
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    x_rows = x_ptr + batch * stride_xb + rows.to(tl.int64)[:, None] * stride_xr

    # --- sweep 1: the row's largest block scale
    row_scale = tl.zeros([BLOCK_R], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        row_scale = tl.maximum(row_scale, tl.max(_block_scales(x, BLOCK_R, NUM_BLOCKS, RCEIL), axis=1))

    # --- sweep 2: quantize each block with its scale, shift it to the row's, store
    out_rows = out_ptr + (batch * R + rows.to(tl.int64))[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        scale = _block_scales(x, BLOCK_R, NUM_BLOCKS, RCEIL)  # (BLOCK_R, NUM_BLOCKS)
        # 1/scale = 2**(127 - scale), NaN for byte 255
        reciprocal = tl.where(scale == 255, float("nan"), _pow2(127 - scale))
        reciprocal = tl.where(scale == 254, 2.0**-127, reciprocal)
        scaled = tl.reshape(x, (BLOCK_R, NUM_BLOCKS, 32)) * reciprocal[:, :, None]
        shift = _pow2(scale - row_scale[:, None])[:, :, None]
        if HW_CAST:  # cvt.rn.satfinite: nearest-even, saturating, NaN kept (the GPU tests check)
            scaled = tl.where(scaled != scaled, scaled, tl.minimum(tl.maximum(scaled, -448.0), 448.0))
            shifted = (scaled.to(tl.float8e4nv).to(tl.float32) * shift).to(tl.float8e4nv)
            out = tl.reshape(shifted, (BLOCK_R, BLOCK_K)).to(tl.uint8, bitcast=True)
        else:
            shifted = _round_e4m3(_round_e4m3(scaled) * shift)
            out = _e4m3_bits(tl.reshape(shifted, (BLOCK_R, BLOCK_K)))
        tl.store(out_rows + cols.to(tl.int64)[None, :], out, mask=mask)
    tl.store(scale_ptr + batch * R + rows, row_scale.to(tl.uint8), mask=row_mask)


def quantize_rebase_rows(
    x: torch.Tensor, mode: str = "rceil", *, block_r: int = 1, block_k: int = 2048, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerics.rebase_rowwise(*numerics.to_mx(x, mode=mode))`` in one CUDA kernel.

    Input: ``x`` (..., K) bf16/fp16/fp32 on CUDA, any strides (2D and 3D views are read in
    place), K a multiple of 32. Output: ``(rebased (..., K) e4m3 contiguous, row scales (...) u8)``.
    The default tile (one row a program, 2048-wide chunks) was the fastest of a sweep on an H100
    (benchmarks/RESULTS.md).
    """
    check_high_precision("x", x)
    check_block_dim("x", x, -1)
    rceil = ScaleMode.parse(mode) is ScaleMode.RCEIL
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.uint8, device=x.device)
    if x.dim() == 3:
        x3 = x
    elif x.dim() == 2:
        x3 = x.unsqueeze(0)
    else:  # rows of any other rank, flattened (a copy only where strides do not allow a view)
        x3 = x.reshape(-1, *x.shape[-2:]) if x.dim() > 3 else x.reshape(1, 1, -1)
    batches, rows, k = x3.shape
    if x3.numel() == 0:
        return out, scales
    block_k = max(min(block_k, triton.next_power_of_2(k)), BLOCK_SIZE)
    grid = (triton.cdiv(rows, block_r), batches)
    _quantize_rebase_rows_kernel[grid](
        x3, out.view(torch.uint8), scales, rows, k, x3.stride(0), x3.stride(1), x3.stride(2),
        BLOCK_R=block_r, BLOCK_K=block_k, RCEIL=rceil, HW_CAST=not _INTERPRETED, num_warps=num_warps,
    )
    return out, scales
