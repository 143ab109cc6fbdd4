"""The ``mxfp8::`` custom ops: what the graph passes insert, with fake and reference kernels.

Importing this module registers the ops (``torch.ops.mxfp8.*``). Each op has a fake (meta)
implementation for tracing and a reference implementation for every device, built on
``mxfp8_compile.numerics`` (the emulated target). Faster implementations are registered for CUDA
(``register_kernel("cuda")``: the Triton cast kernels, the hardware FP8 GEMMs) and are checked
against the reference: bit for bit for casts, by SQNR for GEMMs.

Contracts (``numerics`` states the layout conventions):

=========================  ========================================================================
quantize                   x (..., D, ...) bf16/fp16/fp32 along ``dim`` -> (qdata e4m3, scales u8)
quantize_token_groups      x (M, K), offs (G,) -> (qdata (Mp, K), scales (Mp/32, K), padded offs)
quantize_token_groups_transposed  the same, written (K, Mp) and (K, Mp/32): the sm100 wgrad's layout
quantize_rows_and_token_groups  x (M, K), offs -> quantize along K and quantize_token_groups_transposed
                           (sm100), x read once on CUDA
quantize_rows_and_token_groups_gathered  the same of ``numerics.gather_rows(src, rows, weights)``,
                           read through ``rows`` (the gather is never written)
dequantize                 (qdata, scales, dim, dtype) -> dtype
quantize_mxint8            x along ``dim`` -> (qdata int8, scales u8): MXINT8, the wire format of
dequantize_mxint8          the all-to-all payloads no GEMM reads (reference kernels everywhere)
to_blocked                 scales (..., R, C) -> SM100 blocked bytes (..., round_up(R,128),
                           round_up(C,4))
to_blocked_m_groups        scales (M, K/32), offs -> per-token-group blocked A scales (2Dx3D)
to_blocked_k_groups        scales (R, Mp/32), padded offs -> per-group blocked scales (2Dx2D)
rebase_rowwise             (qdata, scales, dim) -> (rebased e4m3, one u8 scale per row)  (SM90)
quantize_rebase            x (..., K) -> quantize then rebase_rowwise, fused (Triton on CUDA; under
                           Inductor a template that fuses its producer, lowering/inductor_quantize.py)
square_tile_scales         x (.., R, C) -> the scale bytes of its 32x32 tiles (.., R/32, C/32)
quantize_rebase_square     (x, its tile scales) -> to_mx_square with them, then rebase_square along
                           C: (rebased, row scales (.., R)) (SM90, 32x32 weights; x or x.mT)
rebase_token_groups        (qdata (Mp,K), scales, padded offs) -> (rebased, scales (G, K)) (SM90)
quantize_rebase_token_groups  x (M, K), offs -> quantize_token_groups then rebase_token_groups,
                           data transposed (K, Mp) (Triton on CUDA)
quantize_rebase_gathered, quantize_rebase_token_groups_gathered  (src, rows, weights[, offs]) ->
                           the two of ``numerics.gather_rows(src, rows, weights)``, read through ``rows``
scaled_grouped_mm          MX operands, offs -> out_dtype: 2Dx3D (M,K)x(E,K,N)->(M,N) or
                           2Dx2D (N,Mp)x(Mp,K)->(G,N,K); scales along the contraction dim
scaled_mm                  MX (M,K) x (K,N) -> (M,N) out_dtype
scaled_grouped_mm_rowwise  e4m3 operands with fp32 power-of-two scales per contraction row (the
scaled_mm_rowwise          rebased ones, ``numerics.e8m0_to_fp32`` of their bytes) (SM90)
scaled_grouped_mm_blocked  as scaled_grouped_mm, scales in the blocked layouts above (SM100:
                           torch._scaled_grouped_mm; emulated elsewhere)
scaled_mm_blocked          as scaled_mm, scales to_blocked (SM100: torch._scaled_mm)
=========================  ========================================================================

The rearrange step of the emulated target is the identity: it consumes MX scales as they are, so
the passes insert no node for it (a custom op cannot return its input without a copy).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mxfp8_compile import numerics
from mxfp8_compile.numerics import BLOCK_SIZE, padded_rows_bound

_E4M3 = torch.float8_e4m3fn
_U8 = torch.uint8
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _scales_shape(shape: torch.Size | list[int], dim: int) -> list[int]:
    out = list(shape)
    out[dim] //= BLOCK_SIZE
    return out


# --------------------------------------------------------------------------------------------
# Quantize / dequantize.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mxfp8::quantize", mutates_args=())
def quantize(x: Tensor, dim: int = -1, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    """MX-quantize ``x`` along ``dim``: ``numerics.to_mx``. On CUDA, along the last dim, one
    Triton kernel."""
    return numerics.to_mx(x, dim=dim, mode=mode)


@quantize.register_kernel("cuda")
def _(x: Tensor, dim: int = -1, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    if x.dim() == 0 or dim % x.dim() != x.dim() - 1:  # along another dim: the reference
        return numerics.to_mx(x, dim=dim, mode=mode)
    from mxfp8_compile.lowering.triton_quantize import quantize_rows

    return quantize_rows(x, mode)


@quantize.register_fake
def _quantize_fake(x: Tensor, dim: int = -1, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    numerics.check_high_precision("x", x)
    dim = numerics.check_block_dim("x", x, dim)
    numerics.ScaleMode.parse(mode)
    return x.new_empty(x.shape, dtype=_E4M3), x.new_empty(_scales_shape(x.shape, dim), dtype=_U8)


@torch.library.custom_op("mxfp8::quantize_square", mutates_args=())
def quantize_square(x: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    """MX-quantize ``x`` (.., R, C) with one scale per 32x32 tile: ``numerics.to_mx_square``
    (the reference on every device; no kernel yet)."""
    return numerics.to_mx_square(x, mode=mode)


def _square_tiles_shape(x: Tensor) -> list[int]:
    """Check x for a 32x32-tile cast; the shape of its tile scales."""
    numerics.check_square("x", x)
    return _scales_shape(_scales_shape(x.shape, x.dim() - 1), x.dim() - 2)


@quantize_square.register_fake
def _(x: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    numerics.ScaleMode.parse(mode)
    return x.new_empty(x.shape, dtype=_E4M3), x.new_empty(_square_tiles_shape(x), dtype=_U8)


@torch.library.custom_op("mxfp8::pad_to_block", mutates_args=())
def pad_to_block(x: Tensor, dim: int) -> Tensor:
    """``x`` zero-padded along ``dim`` to a multiple of 32: ``numerics.pad_to_block``. For a
    contraction dim that is not a multiple of 32, or not known to be one (symbolic token counts)."""
    return numerics.pad_to_block(x, dim)


@pad_to_block.register_fake
def _(x: Tensor, dim: int) -> Tensor:
    shape = list(x.shape)
    shape[dim % x.dim()] = numerics.round_up(shape[dim % x.dim()], BLOCK_SIZE)
    return x.new_empty(shape)


@torch.library.custom_op("mxfp8::quantize_token_groups", mutates_args=())
def quantize_token_groups(
    x: Tensor, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor]:
    """MX-quantize ``x`` (M, K) along tokens per group: ``numerics.to_mx_token_groups``. One
    Triton kernel on CUDA."""
    return numerics.to_mx_token_groups(x, offs, mode=mode)


def _padded_token_rows(x: Tensor, offs: Tensor, mode: str) -> int:
    """Check the arguments of a token-group quantization; Mp, the rows after padding."""
    numerics.check_high_precision("x", x)
    numerics.check_offsets("offs", offs)
    numerics.ScaleMode.parse(mode)
    numerics.check_tokens("x", x)
    return padded_rows_bound(x.shape[0], offs.shape[0], BLOCK_SIZE)


@quantize_token_groups.register_kernel("cuda")
def _(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import quantize_token_groups as kernel

    return kernel(x, offs, mode)


@quantize_token_groups.register_fake
def _quantize_token_groups_fake(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor]:
    rows = _padded_token_rows(x, offs, mode)
    return (
        x.new_empty(rows, x.shape[1], dtype=_E4M3),
        x.new_empty(rows // BLOCK_SIZE, x.shape[1], dtype=_U8),
        offs.new_empty(offs.shape),
    )


@torch.library.custom_op("mxfp8::quantize_token_groups_transposed", mutates_args=())
def quantize_token_groups_transposed(
    x: Tensor, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_token_groups`` written transposed, tokens contiguous: x (M, K) -> (qdata (K, Mp)
    e4m3, scales (K, Mp/32) u8, padded offs (G,) int32), contiguous. Both operands of the sm100
    wgrad in the layout torch's MX GEMM reads them: ``qdata`` of dy is A (N, Mp) row-major, the
    transpose of x's is B (Mp, K) column-major. One Triton kernel on CUDA."""
    qdata, scales, padded_offs = numerics.to_mx_token_groups(x, offs, mode=mode)
    return qdata.t().contiguous(), scales.t().contiguous(), padded_offs


@quantize_token_groups_transposed.register_kernel("cuda")
def _(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import quantize_token_groups as kernel

    return kernel(x, offs, mode, tokens_contiguous=True)


@quantize_token_groups_transposed.register_fake
def _quantize_token_groups_transposed_fake(
    x: Tensor, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor]:
    data, scales, padded_offs = _quantize_token_groups_fake(x, offs, mode)
    return data.new_empty(data.shape[::-1]), scales.new_empty(scales.shape[::-1]), padded_offs


@torch.library.custom_op("mxfp8::quantize_rows_and_token_groups", mutates_args=())
def quantize_rows_and_token_groups(
    x: Tensor, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``quantize(x, -1)`` and ``quantize_token_groups_transposed(x, offs)`` together: x (M, K)
    -> (rows (M, K), row scales (M, K/32), token groups (K, Mp), their scales (K, Mp/32), padded
    offs). The MX operands of a grouped GEMM along K and of its wgrad along tokens (sm100); on
    CUDA one Triton kernel that reads x once."""
    return (*quantize(x, -1, mode), *quantize_token_groups_transposed(x, offs, mode))


@quantize_rows_and_token_groups.register_kernel("cuda")
def _(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import quantize_rows_and_token_groups as kernel

    return kernel(x, offs, mode)


@quantize_rows_and_token_groups.register_fake
def _(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (*_quantize_fake(x, -1, mode), *_quantize_token_groups_transposed_fake(x, offs, mode))


def _gathered_rows_fake(src: Tensor, rows: Tensor, weights: Tensor | None) -> Tensor:
    """Check a gathered cast's source; the gathered operand (M, K), empty, for the fakes."""
    numerics.check_gather(src, rows, weights)
    return src.new_empty(rows.shape[0], src.shape[1])


@torch.library.custom_op("mxfp8::quantize_rows_and_token_groups_gathered", mutates_args=())
def quantize_rows_and_token_groups_gathered(
    src: Tensor, rows: Tensor, weights: Tensor | None, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``quantize_rows_and_token_groups`` of ``numerics.gather_rows(src, rows, weights)``: on
    CUDA one Triton kernel that reads each gathered row of ``src`` once, so that the gathered
    (M, K) operand is never written (sm100)."""
    return quantize_rows_and_token_groups(numerics.gather_rows(src, rows, weights), offs, mode)


@quantize_rows_and_token_groups_gathered.register_kernel("cuda")
def _(src: Tensor, rows: Tensor, weights: Tensor | None, offs: Tensor, mode: str = "rceil"
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import RowSource, quantize_rows_and_token_groups as kernel

    return kernel(src, offs, mode, source=RowSource(rows, weights))


@quantize_rows_and_token_groups_gathered.register_fake
def _(src: Tensor, rows: Tensor, weights: Tensor | None, offs: Tensor, mode: str = "rceil"
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = _gathered_rows_fake(src, rows, weights)
    return (*_quantize_fake(x, -1, mode), *_quantize_token_groups_transposed_fake(x, offs, mode))


@torch.library.custom_op("mxfp8::dequantize", mutates_args=())
def dequantize(qdata: Tensor, scales: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """``numerics.from_mx``, contiguous."""
    return numerics.from_mx(qdata, scales, dim=dim, dtype=dtype).contiguous()


@dequantize.register_fake
def _(qdata: Tensor, scales: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    numerics.check_qdata("qdata", qdata, scales, dim)
    return qdata.new_empty(qdata.shape, dtype=dtype)


@torch.library.custom_op("mxfp8::quantize_mxint8", mutates_args=())
def quantize_mxint8(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """``numerics.to_mxint8``."""
    return numerics.to_mxint8(x, dim=dim)


@quantize_mxint8.register_fake
def _(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    numerics.check_high_precision("x", x)
    dim = numerics.check_block_dim("x", x, dim)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(_scales_shape(x.shape, dim), dtype=_U8)


@torch.library.custom_op("mxfp8::dequantize_mxint8", mutates_args=())
def dequantize_mxint8(qdata: Tensor, scales: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """``numerics.from_mxint8``, contiguous."""
    return numerics.from_mxint8(qdata, scales, dim=dim, dtype=dtype).contiguous()


@dequantize_mxint8.register_fake
def _(qdata: Tensor, scales: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    numerics.check_qdata("qdata", qdata, scales, dim, torch.int8)
    return qdata.new_empty(qdata.shape, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Rearrange: SM100 blocked layouts.
# --------------------------------------------------------------------------------------------


def _check_scales(name: str, scales: Tensor, ndim: int | None = None) -> None:
    if scales.dtype != _U8:
        raise TypeError(f"{name} must be uint8 E8M0 bytes, got {scales.dtype}")
    if ndim is not None and scales.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}D, got shape {tuple(scales.shape)}")


@torch.library.custom_op("mxfp8::to_blocked", mutates_args=())
def to_blocked(scales: Tensor) -> Tensor:
    """``numerics.to_blocked`` of (..., R, C) scales."""
    _check_scales("scales", scales)
    return numerics.to_blocked(scales)


@to_blocked.register_fake
def _(scales: Tensor) -> Tensor:
    _check_scales("scales", scales)
    if scales.dim() < 2:
        raise ValueError(f"scales must be (..., rows, cols), got shape {tuple(scales.shape)}")
    rows, cols = numerics.blocked_shape(scales.shape[-2], scales.shape[-1])
    return scales.new_empty(*scales.shape[:-2], rows, cols)


@torch.library.custom_op("mxfp8::to_blocked_m_groups", mutates_args=())
def to_blocked_m_groups(scales: Tensor, offs: Tensor) -> Tensor:
    """``numerics.to_blocked_m_groups``: per-token-group blocked scales of a 2Dx3D A operand."""
    _check_scales("scales", scales, 2)
    return numerics.to_blocked_m_groups(scales, offs)


@to_blocked_m_groups.register_fake
def _(scales: Tensor, offs: Tensor) -> Tensor:
    _check_scales("scales", scales, 2)
    numerics.check_offsets("offs", offs)
    rows = padded_rows_bound(scales.shape[0], offs.shape[0], numerics.BLOCKED_TILE_ROWS)
    return scales.new_empty(rows, numerics.blocked_shape(1, scales.shape[1])[1])


@torch.library.custom_op("mxfp8::to_blocked_k_groups", mutates_args=())
def to_blocked_k_groups(scales: Tensor, offs: Tensor) -> Tensor:
    """``numerics.to_blocked_k_groups``: per-group blocked scales of a 2Dx2D operand."""
    _check_scales("scales", scales, 2)
    return numerics.to_blocked_k_groups(scales, offs)


@to_blocked_k_groups.register_fake
def _(scales: Tensor, offs: Tensor) -> Tensor:
    _check_scales("scales", scales, 2)
    numerics.check_offsets("offs", offs)
    cols = padded_rows_bound(scales.shape[1], offs.shape[0], numerics.BLOCKED_TILE_COLS)
    return scales.new_empty(numerics.blocked_shape(scales.shape[0], 1)[0], cols)


# --------------------------------------------------------------------------------------------
# Rearrange: SM90 rowwise rebase.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mxfp8::rebase_rowwise", mutates_args=())
def rebase_rowwise(qdata: Tensor, scales: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``numerics.rebase_rowwise``: one scale per contraction row."""
    return numerics.rebase_rowwise(qdata, scales, dim=dim)


@rebase_rowwise.register_fake
def _(qdata: Tensor, scales: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    dim = numerics.check_qdata("qdata", qdata, scales, dim)
    row_shape = [s for i, s in enumerate(qdata.shape) if i != dim]
    return qdata.new_empty(qdata.shape), scales.new_empty(row_shape)


@torch.library.custom_op("mxfp8::quantize_rebase", mutates_args=())
def quantize_rebase(x: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    """MX-quantize ``x`` along its last dim, then rebase each row to one scale:
    ``numerics.rebase_rowwise(*numerics.to_mx(x))``. One Triton kernel on CUDA."""
    qdata, scales = numerics.to_mx(x, dim=-1, mode=mode)
    return numerics.rebase_rowwise(qdata, scales, dim=-1)


@quantize_rebase.register_kernel("cuda")
def _(x: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import quantize_rebase_rows

    return quantize_rebase_rows(x, mode)


@quantize_rebase.register_fake
def _quantize_rebase_fake(x: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    numerics.check_high_precision("x", x)
    numerics.check_block_dim("x", x, -1)
    numerics.ScaleMode.parse(mode)
    return x.new_empty(x.shape, dtype=_E4M3), x.new_empty(x.shape[:-1], dtype=_U8)


@torch.library.custom_op("mxfp8::square_tile_scales", mutates_args=())
def square_tile_scales(x: Tensor, mode: str = "rceil") -> Tensor:
    """The scale bytes (.., R/32, C/32) of x's 32x32 tiles: ``numerics.to_mx_square(x)[1]``, for
    ``quantize_rebase_square`` of each orientation. One Triton kernel on CUDA."""
    return numerics.to_mx_square(x, mode=mode)[1]


@square_tile_scales.register_kernel("cuda")
def _(x: Tensor, mode: str = "rceil") -> Tensor:
    from mxfp8_compile.lowering.triton_quantize import square_tile_scales as kernel

    return kernel(x, mode)


@square_tile_scales.register_fake
def _(x: Tensor, mode: str = "rceil") -> Tensor:
    numerics.ScaleMode.parse(mode)
    return x.new_empty(_square_tiles_shape(x), dtype=_U8)


@torch.library.custom_op("mxfp8::quantize_rebase_square", mutates_args=())
def quantize_rebase_square(x: Tensor, tile_scales: Tensor) -> tuple[Tensor, Tensor]:
    """x (.., R, C) quantized with its 32x32 tile scales (``square_tile_scales``; of a weight's
    transposed view, the weight's transposed), then rebased along its last dim:
    ``numerics.rebase_square(*numerics.to_mx_square(x, tile_scales=tile_scales))``, the rebased
    e4m3 (.., R, C) and row scales (.., R). One Triton kernel on CUDA, one read of x."""
    qdata, tiles = numerics.to_mx_square(x, tile_scales=tile_scales)
    return numerics.rebase_square(qdata, tiles, dim=-1)


@quantize_rebase_square.register_kernel("cuda")
def _(x: Tensor, tile_scales: Tensor) -> tuple[Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import quantize_rebase_square as kernel

    return kernel(x, tile_scales)


@quantize_rebase_square.register_fake
def _(x: Tensor, tile_scales: Tensor) -> tuple[Tensor, Tensor]:
    _square_tiles_shape(x)
    numerics.check_tile_scales(x, tile_scales)
    return x.new_empty(x.shape, dtype=_E4M3), x.new_empty(x.shape[:-1], dtype=_U8)


@torch.library.custom_op("mxfp8::rebase_token_groups", mutates_args=())
def rebase_token_groups(qdata: Tensor, scales: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    """``numerics.rebase_token_groups``: one scale per (group, column)."""
    return numerics.rebase_token_groups(qdata, scales, offs)


@rebase_token_groups.register_fake
def _(qdata: Tensor, scales: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    numerics.check_qdata("qdata", qdata, scales, 0)
    numerics.check_offsets("offs", offs)
    return qdata.new_empty(qdata.shape), scales.new_empty(offs.shape[0], scales.shape[1])


@torch.library.custom_op("mxfp8::quantize_rebase_token_groups", mutates_args=())
def quantize_rebase_token_groups(
    x: Tensor, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_token_groups`` then ``rebase_token_groups``, the data transposed: x (M, K) ->
    (rebased (K, Mp) e4m3 contiguous, group scales (G, K) u8, padded offs (G,) int32).
    Tokens come out contiguous, the layout the wgrad's FP8 GEMM takes for both operands.
    One Triton kernel on CUDA."""
    qdata, scales, padded_offs = numerics.to_mx_token_groups(x, offs, mode=mode)
    rebased, group_scales = numerics.rebase_token_groups(qdata, scales, padded_offs)
    return rebased.t().contiguous(), group_scales, padded_offs


@quantize_rebase_token_groups.register_kernel("cuda")
def _(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import quantize_rebase_token_groups as kernel

    return kernel(x, offs, mode)


@quantize_rebase_token_groups.register_fake
def _quantize_rebase_token_groups_fake(x: Tensor, offs: Tensor, mode: str = "rceil") -> tuple[Tensor, Tensor, Tensor]:
    rows = _padded_token_rows(x, offs, mode)
    return (
        x.new_empty(x.shape[1], rows, dtype=_E4M3),
        x.new_empty(offs.shape[0], x.shape[1], dtype=_U8),
        offs.new_empty(offs.shape),
    )


@torch.library.custom_op("mxfp8::quantize_rebase_gathered", mutates_args=())
def quantize_rebase_gathered(src: Tensor, rows: Tensor, weights: Tensor | None, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    """``quantize_rebase`` of ``numerics.gather_rows(src, rows, weights)`` (M, K): (rebased (M, K)
    e4m3, row scales (M,) u8). For an operand a token permutation produces: on CUDA the kernel
    reads ``src`` through ``rows``, so that the gathered operand is never written (SM90)."""
    return quantize_rebase(numerics.gather_rows(src, rows, weights), mode)


@quantize_rebase_gathered.register_kernel("cuda")
def _(src: Tensor, rows: Tensor, weights: Tensor | None, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import RowSource, quantize_rebase_rows

    return quantize_rebase_rows(src, mode, source=RowSource(rows, weights))


@quantize_rebase_gathered.register_fake
def _(src: Tensor, rows: Tensor, weights: Tensor | None, mode: str = "rceil") -> tuple[Tensor, Tensor]:
    return _quantize_rebase_fake(_gathered_rows_fake(src, rows, weights), mode)


@torch.library.custom_op("mxfp8::quantize_rebase_token_groups_gathered", mutates_args=())
def quantize_rebase_token_groups_gathered(
    src: Tensor, rows: Tensor, weights: Tensor | None, offs: Tensor, mode: str = "rceil"
) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_rebase_token_groups`` of ``numerics.gather_rows(src, rows, weights)``, read
    through ``rows`` on CUDA as ``quantize_rebase_gathered`` (SM90). A separate op from the row
    cast, as the ungathered casts are, so that the scheduler places each where its GEMM needs it."""
    return quantize_rebase_token_groups(numerics.gather_rows(src, rows, weights), offs, mode)


@quantize_rebase_token_groups_gathered.register_kernel("cuda")
def _(src: Tensor, rows: Tensor, weights: Tensor | None, offs: Tensor, mode: str = "rceil"
      ) -> tuple[Tensor, Tensor, Tensor]:
    from mxfp8_compile.lowering.triton_quantize import RowSource, quantize_rebase_token_groups as kernel

    return kernel(src, offs, mode, source=RowSource(rows, weights))


@quantize_rebase_token_groups_gathered.register_fake
def _(src: Tensor, rows: Tensor, weights: Tensor | None, offs: Tensor, mode: str = "rceil"
      ) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_rebase_token_groups_fake(_gathered_rows_fake(src, rows, weights), offs, mode)


# --------------------------------------------------------------------------------------------
# GEMMs (emulated: dequantize exactly to bf16, then the bf16 GEMM).
# --------------------------------------------------------------------------------------------


def _check_dims(qa: Tensor, qb: Tensor, b_dims: tuple[int, ...]) -> None:
    if qa.dim() != 2:
        raise ValueError(f"A must be 2D, got shape {tuple(qa.shape)}")
    if qb.dim() not in b_dims:
        raise ValueError(f"B must be {' or '.join(map(str, b_dims))}D, got shape {tuple(qb.shape)}")


def _check_contraction(qa: Tensor, qb: Tensor) -> None:
    """A (.., K) against B (.., K, N)."""
    if qa.shape[-1] != qb.shape[-2]:
        raise ValueError(
            f"contraction dims differ: A {tuple(qa.shape)} has {qa.shape[-1]}, "
            f"B {tuple(qb.shape)} has {qb.shape[-2]}"
        )


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _check_fp8_data(qa: Tensor, qb: Tensor) -> None:
    for name, q in (("A", qa), ("B", qb)):
        if q.dtype != _E4M3:
            raise TypeError(f"{name} data must be float8_e4m3fn, got {q.dtype}")


def _check_groups(qb: Tensor, offs: Tensor) -> None:
    """Group end offsets, one group per expert of a 3D B."""
    numerics.check_offsets("offs", offs)
    if qb.dim() == 3 and offs.shape[0] != qb.shape[0]:
        raise ValueError(
            f"offs has {offs.shape[0]} groups but B of shape {tuple(qb.shape)} has "
            f"{qb.shape[0]} experts"
        )


def _check_gemm(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype, b_dims: tuple[int, ...]
) -> None:
    """Check MX GEMM operands: A (..., K) scaled along dim -1, B (..., K, N) along dim -2."""
    _check_dims(qa, qb, b_dims)
    numerics.check_qdata("A", qa, sa, -1)
    numerics.check_qdata("B", qb, sb, -2)
    _check_contraction(qa, qb)
    _check_out_dtype(out_dtype)


def _check_grouped_gemm(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor, out_dtype: torch.dtype
) -> None:
    _check_gemm(qa, sa, qb, sb, out_dtype, (2, 3))
    _check_groups(qb, offs)


def _compute_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The GEMM's own output dtype: MX values are exact in bf16, and a bf16 GEMM accumulates in
    fp32; an fp32 result is computed in fp32 rather than rounded through a bf16 output."""
    return torch.float32 if out_dtype == torch.float32 else torch.bfloat16


def _dequantize_a(qa: Tensor, sa: Tensor, dtype: torch.dtype) -> Tensor:
    """A (.., K) in ``dtype``, K contiguous (row-major)."""
    return numerics.from_mx(qa, sa, dim=-1, dtype=dtype).contiguous()


def _dequantize_b(qb: Tensor, sb: Tensor, dtype: torch.dtype) -> Tensor:
    """B (..., K, N) in ``dtype`` with K contiguous (column-major): ``_grouped_mm`` takes any N."""
    bt = numerics.from_mx(qb.transpose(-2, -1), sb.transpose(-2, -1), dim=-1, dtype=dtype)
    return bt.contiguous().transpose(-2, -1)


@torch.library.custom_op("mxfp8::scaled_grouped_mm", mutates_args=())
def scaled_grouped_mm(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """Grouped GEMM of MX operands, emulated: ``torch._grouped_mm`` of the exact bf16 values.

    2Dx3D: ``qa`` (M, K), ``sa`` (M, K/32), ``qb`` (E, K, N), ``sb`` (E, K/32, N), ``offs`` (E,)
    token end offsets -> (M, N). 2Dx2D: ``qa`` (N, Mp), ``sa`` (N, Mp/32), ``qb`` (Mp, K),
    ``sb`` (Mp/32, K), ``offs`` (G,) end offsets along Mp -> (G, N, K).
    """
    _check_grouped_gemm(qa, sa, qb, sb, offs, out_dtype)
    dtype = _compute_dtype(out_dtype)
    out = torch._grouped_mm(_dequantize_a(qa, sa, dtype), _dequantize_b(qb, sb, dtype), offs=offs)
    return out.to(out_dtype)


@scaled_grouped_mm.register_fake
def _(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor, out_dtype: torch.dtype
) -> Tensor:
    _check_grouped_gemm(qa, sa, qb, sb, offs, out_dtype)
    if qb.dim() == 3:
        return qa.new_empty(qa.shape[0], qb.shape[-1], dtype=out_dtype)
    return qa.new_empty(offs.shape[0], qa.shape[0], qb.shape[-1], dtype=out_dtype)


@torch.library.custom_op("mxfp8::scaled_mm", mutates_args=())
def scaled_mm(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Dense GEMM of MX operands, emulated: ``qa`` (M, K) x ``qb`` (K, N) -> (M, N)."""
    _check_gemm(qa, sa, qb, sb, out_dtype, (2,))
    dtype = _compute_dtype(out_dtype)
    return torch.mm(_dequantize_a(qa, sa, dtype), _dequantize_b(qb, sb, dtype)).to(out_dtype)


@scaled_mm.register_fake
def _(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    _check_gemm(qa, sa, qb, sb, out_dtype, (2,))
    return qa.new_empty(qa.shape[0], qb.shape[1], dtype=out_dtype)


# --------------------------------------------------------------------------------------------
# SM90: FP8 GEMMs with one power-of-two scale per contraction row (after the rowwise rebase).
# --------------------------------------------------------------------------------------------


def _check_rowwise(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor | None) -> None:
    """A (.., K) with one fp32 scale per row; B (.., K, N) with one per column (per group for
    2Dx2D, where the contraction runs over each group's tokens)."""
    _check_fp8_data(qa, qb)
    for name, s in (("A", sa), ("B", sb)):
        if s.dtype != torch.float32:
            raise TypeError(
                f"{name} row scales must be float32 (numerics.e8m0_to_fp32 of the rebase's E8M0 bytes), got {s.dtype}"
            )
    _check_contraction(qa, qb)
    if offs is not None and qb.dim() == 2:  # 2Dx2D: per group and row
        expected = ((offs.shape[0], qa.shape[0]), (offs.shape[0], qb.shape[1]))
    elif offs is not None:
        expected = ((qa.shape[0],), (qb.shape[0], qb.shape[2]))
    else:
        expected = ((qa.shape[0],), (qb.shape[1],))
    for name, s, shape in (("A", sa, expected[0]), ("B", sb, expected[1])):
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"{name} row scales have shape {tuple(s.shape)}, expected {tuple(shape)}")


def _rowwise_operands(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Values of rowwise-scaled operands in ``dtype`` (the emulation of the SM90 GEMMs; exact for
    power-of-two scales)."""
    if offs is not None and qb.dim() == 2:  # the scale of a token column is its group's
        token = torch.arange(qa.shape[1], device=qa.device, dtype=torch.int32)
        group, _ = numerics.group_of(token, offs)
        a = qa.float() * sa[group].t()
        b = qb.float() * sb[group]
    else:
        a = qa.float() * sa[..., None]
        b = qb.float() * sb.unsqueeze(-2)
    return a.to(dtype), b.mT.contiguous().mT.to(dtype)


def _fp8_gemm_layouts(qa: Tensor, qb: Tensor) -> tuple[Tensor, Tensor]:
    """The layouts torch's FP8 GEMMs take: A row-major, B column-major (copies only if not)."""
    qa = qa if qa.stride(-1) == 1 else qa.contiguous()
    qb = qb if qb.stride(-2) == 1 else qb.mT.contiguous().mT
    return qa, qb


@torch.library.custom_op("mxfp8::scaled_grouped_mm_rowwise", mutates_args=())
def scaled_grouped_mm_rowwise(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor, out_dtype: torch.dtype, fast_accum: bool
) -> Tensor:
    """FP8 grouped GEMM with power-of-two rowwise scales (SM90's path).

    2Dx3D: ``qa`` (M, K), ``sa`` (M,); ``qb`` (E, K, N), ``sb`` (E, N); ``offs`` (E,) -> (M, N).
    2Dx2D: ``qa`` (N, Mp), ``sa`` (G, N); ``qb`` (Mp, K), ``sb`` (G, K); ``offs`` (G,) -> (G, N, K).
    Data e4m3; scales fp32, the rebase's E8M0 bytes decoded (``numerics.e8m0_to_fp32``), which
    the graph does ahead of the op so that Inductor fuses it rather than the op launching it.
    This implementation emulates it exactly (the operands' exact values, fp32 accumulation); on
    CUDA it is ``torch._scaled_grouped_mm``, whose output is bf16 only (an fp32 ``out_dtype`` is
    a cast of it there).
    """
    _check_rowwise(qa, sa, qb, sb, offs)
    if offs.shape[0] == 0:  # no groups: nothing to multiply
        shape = (0, qa.shape[0], qb.shape[-1]) if qb.dim() == 2 else (qa.shape[0], qb.shape[-1])
        return qa.new_zeros(shape, dtype=out_dtype)
    a, b = _rowwise_operands(qa, sa, qb, sb, offs, _compute_dtype(out_dtype))
    return torch._grouped_mm(a, b, offs=offs).to(out_dtype)


@scaled_grouped_mm_rowwise.register_kernel("cuda")
def _(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor, out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    _check_rowwise(qa, sa, qb, sb, offs)
    if qb.dim() == 2:  # 2Dx2D takes flat (groups x rows) scales
        sa, sb = sa.reshape(-1), sb.reshape(-1)
    qa, qb = _fp8_gemm_layouts(qa, qb)
    out = torch._scaled_grouped_mm(qa, qb, sa, sb, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return out.to(out_dtype)


@scaled_grouped_mm_rowwise.register_fake
def _(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor, out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    _check_rowwise(qa, sa, qb, sb, offs)
    if qb.dim() == 3:
        return qa.new_empty(qa.shape[0], qb.shape[-1], dtype=out_dtype)
    return qa.new_empty(offs.shape[0], qa.shape[0], qb.shape[-1], dtype=out_dtype)


@torch.library.custom_op("mxfp8::scaled_mm_rowwise", mutates_args=())
def scaled_mm_rowwise(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype, fast_accum: bool
) -> Tensor:
    """Dense FP8 GEMM with power-of-two rowwise scales: ``qa`` (M, K), ``sa`` (M,); ``qb`` (K, N),
    ``sb`` (N,) -> (M, N), scales fp32 as ``scaled_grouped_mm_rowwise``'s. Emulated here;
    ``torch._scaled_mm`` on CUDA."""
    _check_rowwise(qa, sa, qb, sb, None)
    a, b = _rowwise_operands(qa, sa, qb, sb, None, _compute_dtype(out_dtype))
    return torch.mm(a, b).to(out_dtype)


@scaled_mm_rowwise.register_kernel("cuda")
def _(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    _check_rowwise(qa, sa, qb, sb, None)
    qa, qb = _fp8_gemm_layouts(qa, qb)
    out = torch._scaled_mm(qa, qb, sa[:, None], sb[None, :], out_dtype=_compute_dtype(out_dtype),
                           use_fast_accum=fast_accum)
    return out.to(out_dtype)


@scaled_mm_rowwise.register_fake
def _(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    _check_rowwise(qa, sa, qb, sb, None)
    return qa.new_empty(qa.shape[0], qb.shape[1], dtype=out_dtype)


# --------------------------------------------------------------------------------------------
# SM100: torch's MX GEMMs, scales in the blocked layout. No SM100 device was at hand: the CUDA
# kernels are checked against torch's meta functions on fake tensors (tests/test_sm100.py), and
# the emulation below is what runs everywhere else.
# --------------------------------------------------------------------------------------------

_E8M0 = torch.float8_e8m0fnu
_BLOCKED_OPS = (
    "blocked scales come from mxfp8.to_blocked (dense A and B; B (E, N, K/32) of 2Dx3D), "
    "mxfp8.to_blocked_m_groups (A of 2Dx3D) or mxfp8.to_blocked_k_groups (both 2Dx2D operands, "
    "scales (rows, Mp/32))"
)


def _blocked_shapes(
    qa: Tensor, qb: Tensor, groups: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the blocked scales of A (R, C) and B (.., C, N) contracting over C: what the
    ``to_blocked*`` ops return for A's scales (R, C/32) and B's transposed scales (.., N, C/32)."""
    blocks = qa.shape[1] // BLOCK_SIZE
    rows_a, rows_b = qa.shape[0], qb.shape[-1]
    if groups is None:  # dense
        return numerics.blocked_shape(rows_a, blocks), numerics.blocked_shape(rows_b, blocks)
    if qb.dim() == 3:  # 2Dx3D: A per token group, B per expert
        cols = numerics.blocked_shape(1, blocks)[1]
        rows = padded_rows_bound(rows_a, groups, numerics.BLOCKED_TILE_ROWS)
        return (rows, cols), (qb.shape[0], *numerics.blocked_shape(rows_b, blocks))
    cols = padded_rows_bound(blocks, groups, numerics.BLOCKED_TILE_COLS)  # 2Dx2D: per group
    return (numerics.blocked_shape(rows_a, 1)[0], cols), (numerics.blocked_shape(rows_b, 1)[0], cols)


def _check_blocked_gemm(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor | None, out_dtype: torch.dtype
) -> None:
    """Check the operands of ``scaled_grouped_mm_blocked`` (``offs`` given) or
    ``scaled_mm_blocked``: e4m3 data, contraction a multiple of 32, uint8 scales of exactly the
    blocked shapes (a superset of what torch's kernels check: they cannot see group sizes)."""
    _check_fp8_data(qa, qb)
    _check_dims(qa, qb, (2,) if offs is None else (2, 3))
    numerics.check_block_dim("A data", qa, -1)
    _check_contraction(qa, qb)
    if offs is not None:
        _check_groups(qb, offs)
    _check_out_dtype(out_dtype)
    expected = _blocked_shapes(qa, qb, None if offs is None else offs.shape[0])
    for name, s, shape in (("A", sa, expected[0]), ("B", sb, expected[1])):
        _check_scales(f"{name} blocked scales", s)
        if tuple(s.shape) != shape:
            raise ValueError(
                f"{name} blocked scales have shape {tuple(s.shape)}, expected {shape} for A "
                f"{tuple(qa.shape)} and B {tuple(qb.shape)}: {_BLOCKED_OPS}"
            )


def _unblocked_scales(
    qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, offs: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The MX scales the blocked ones hold, in ``numerics``' layout: A (R, C/32), B (.., C/32, N)."""
    if offs is None:
        layout_a = layout_b = numerics.to_blocked
    elif qb.dim() == 3:
        layout_a, layout_b = functools.partial(numerics.to_blocked_m_groups, offs=offs), numerics.to_blocked
    else:
        layout_a = layout_b = functools.partial(numerics.to_blocked_k_groups, offs=offs)
    blocks = qa.shape[1] // BLOCK_SIZE
    scales_a = numerics.undo_layout(layout_a, sa, (qa.shape[0], blocks))
    scales_bt = numerics.undo_layout(layout_b, sb, (*qb.shape[:-2], qb.shape[-1], blocks))
    return scales_a, scales_bt.transpose(-2, -1)


def _require_mx_gemm_device(device: torch.device) -> None:
    """Raise ``RuntimeError`` unless torch's MX GEMMs may be launched on ``device``.

    Checked before every launch: below SM100, torch's MX grouped GEMM launches its SM100 kernel
    anyway and the CUDA context dies (seen on an H100), so it must never be reached there.
    """
    from mxfp8_compile.lowering import targets

    capability = targets.device_capability(device)
    if not targets.has_mx_gemm(capability):
        raise RuntimeError(
            f"the MX GEMMs of target 'sm100' need a GPU torch builds MX kernels for (B200, GB200, "
            f"B300: compute capability 10.0, 10.3), but {device} has capability {capability}; "
            f"torch's MX kernels would kill the CUDA context there. Compile with Config(target='auto') to get "
            f"'sm90' or 'emulated' on this device."
        )


def _e8m0(blocked: Tensor) -> Tensor:
    """Blocked uint8 scales as the contiguous ``float8_e8m0fnu`` tensor torch's MX GEMMs read."""
    return (blocked if blocked.is_contiguous() else blocked.contiguous()).view(_E8M0)


def _padded_rows(qa: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    """The e4m3 rows of a 2Dx3D A operand with each token group padded to 32 rows
    (``numerics.pad_token_groups``), and the padded offsets."""
    padded, padded_offs = numerics.pad_token_groups(qa.view(_U8), offs)
    return padded.view(_E4M3), padded_offs


@torch.library.custom_op("mxfp8::scaled_grouped_mm_blocked", mutates_args=())
def scaled_grouped_mm_blocked(
    qa: Tensor, sa_blocked: Tensor, qb: Tensor, sb_blocked: Tensor, offs: Tensor, out_dtype: torch.dtype,
    ragged_groups: bool = False,
) -> Tensor:
    """MX grouped GEMM with blocked scales (SM100's path): ``torch._scaled_grouped_mm`` on CUDA,
    whose MX kernel is MSLK's (formerly FBGEMM's) CUTLASS grouped GEMM in torch 2.11.

    2Dx3D (forward, dgrad): ``qa`` (M, K) e4m3; ``sa_blocked`` = ``to_blocked_m_groups(sa,
    offs)`` of A's scales (M, K/32), (padded_rows_bound(M, E, 128), round_up(K/32, 4)) u8;
    ``qb`` (E, K, N) e4m3; ``sb_blocked`` = ``to_blocked(sbt)`` of B's scales as (E, N, K/32),
    (E, round_up(N, 128), round_up(K/32, 4)) u8; ``offs`` (E,) int32 token end offsets of any
    sizes, empty groups included -> (M, N). Each group's scales start at a 128-row tile of their
    own, the offsets MSLK computes. With ``ragged_groups`` the groups go to the kernel as they
    are; without (the default, as every upstream MX 2d-3d run goes), A's rows are padded per
    group to 32 (``numerics.pad_token_groups``, one copy of the fp8 rows), the GEMM runs on the
    padded offsets and its rows are gathered back (``numerics.unpad_token_groups``). The blocked
    scales are the same bytes either way: a group padded to 32 rows still starts its scales at
    ``sum round_up(size, 128)`` rows, and its padding rows lie where the tile's unused rows were.
    2Dx2D (wgrad): ``qa`` (N, Mp), ``sa_blocked`` = ``to_blocked_k_groups(sa, offs)`` of its
    scales (N, Mp/32); ``qb`` (Mp, K), ``sb_blocked`` = ``to_blocked_k_groups(sbt, offs)`` of
    its scales as (K, Mp/32); ``offs`` (G,) end offsets along Mp, multiples of 32 as the token
    group casts return them (MSLK asserts multiples of 32 on the device) -> (G, N, K), zero for
    an empty group; ``ragged_groups`` does not apply.
    The product is rounded to bf16 (torch's MX grouped GEMM has no other output), then cast to
    ``out_dtype``. Rows past ``offs[-1]`` (2Dx3D) are not computed (zero when padded). On CUDA,
    A is passed row-major and B column-major (copied if not: the sm100 casts write them so),
    scales viewed as ``float8_e8m0fnu``; it refuses to launch below SM100. Elsewhere it is
    emulated exactly: the layouts undone, the same padding, ``scaled_grouped_mm`` with a bf16
    output.
    """
    _check_blocked_gemm(qa, sa_blocked, qb, sb_blocked, offs, out_dtype)
    sa, sb = _unblocked_scales(qa, sa_blocked, qb, sb_blocked, offs)
    if qb.dim() == 2 or ragged_groups:
        return scaled_grouped_mm(qa, sa, qb, sb, offs, torch.bfloat16).to(out_dtype)
    padded_qa, padded_offs = _padded_rows(qa, offs)
    padded_sa, _ = numerics.pad_token_groups(sa, offs)
    out = scaled_grouped_mm(padded_qa, padded_sa, qb, sb, padded_offs, torch.bfloat16)
    return numerics.unpad_token_groups(out, offs, qa.shape[0]).to(out_dtype)


@scaled_grouped_mm_blocked.register_fake
def _(
    qa: Tensor, sa_blocked: Tensor, qb: Tensor, sb_blocked: Tensor, offs: Tensor, out_dtype: torch.dtype,
    ragged_groups: bool = False,
) -> Tensor:
    _check_blocked_gemm(qa, sa_blocked, qb, sb_blocked, offs, out_dtype)
    groups = () if qb.dim() == 3 else (offs.shape[0],)  # 2Dx3D: (M, N); 2Dx2D: (G, N, K)
    return qa.new_empty(*groups, qa.shape[0], qb.shape[-1], dtype=out_dtype)


@scaled_grouped_mm_blocked.register_kernel("cuda")
def _scaled_grouped_mm_blocked_cuda(
    qa: Tensor, sa_blocked: Tensor, qb: Tensor, sb_blocked: Tensor, offs: Tensor, out_dtype: torch.dtype,
    ragged_groups: bool = False,
) -> Tensor:
    """The CUDA kernel of ``scaled_grouped_mm_blocked``: torch's MX grouped GEMM, SM100 only."""
    _check_blocked_gemm(qa, sa_blocked, qb, sb_blocked, offs, out_dtype)
    _require_mx_gemm_device(qa.device)
    rows, gemm_offs = qa.shape[0], offs
    if qb.dim() == 3 and not ragged_groups:
        qa, gemm_offs = _padded_rows(qa, offs)
    qa, qb = _fp8_gemm_layouts(qa, qb)
    # torch takes the 3D B operand's scales as (E, blocked N * blocked K/32), one row per expert.
    scale_b = sb_blocked.reshape(qb.shape[0], -1) if qb.dim() == 3 else sb_blocked
    out = torch._scaled_grouped_mm(
        qa, qb, _e8m0(sa_blocked), _e8m0(scale_b), offs=gemm_offs, out_dtype=torch.bfloat16
    )
    if qb.dim() == 2:
        # MSLK skips empty groups and torch allocates the output uninitialized: zero them.
        out = out.masked_fill((numerics.group_sizes(offs) == 0).view(-1, 1, 1), 0)
    elif gemm_offs is not offs:
        out = numerics.unpad_token_groups(out, offs, rows)
    return out.to(out_dtype)


@torch.library.custom_op("mxfp8::scaled_mm_blocked", mutates_args=())
def scaled_mm_blocked(
    qa: Tensor, sa_blocked: Tensor, qb: Tensor, sb_blocked: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """Dense MX GEMM with blocked scales (SM100's path): ``torch._scaled_mm`` on CUDA.

    ``qa`` (M, K) e4m3, ``sa_blocked`` = ``to_blocked`` of its scales (M, K/32):
    (round_up(M, 128), round_up(K/32, 4)) u8; ``qb`` (K, N) e4m3, ``sb_blocked`` = ``to_blocked``
    of its scales as (N, K/32): (round_up(N, 128), round_up(K/32, 4)) u8 -> (M, N), rounded to
    bf16 then cast to ``out_dtype`` (as the grouped op). CUDA: as ``scaled_grouped_mm_blocked``.
    Elsewhere emulated exactly: the layouts undone, ``scaled_mm`` with a bf16 output.
    """
    _check_blocked_gemm(qa, sa_blocked, qb, sb_blocked, None, out_dtype)
    sa, sb = _unblocked_scales(qa, sa_blocked, qb, sb_blocked, None)
    return scaled_mm(qa, sa, qb, sb, torch.bfloat16).to(out_dtype)


@scaled_mm_blocked.register_fake
def _(qa: Tensor, sa_blocked: Tensor, qb: Tensor, sb_blocked: Tensor, out_dtype: torch.dtype) -> Tensor:
    _check_blocked_gemm(qa, sa_blocked, qb, sb_blocked, None, out_dtype)
    return qa.new_empty(qa.shape[0], qb.shape[1], dtype=out_dtype)


@scaled_mm_blocked.register_kernel("cuda")
def _scaled_mm_blocked_cuda(
    qa: Tensor, sa_blocked: Tensor, qb: Tensor, sb_blocked: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """The CUDA kernel of ``scaled_mm_blocked``: torch's MX ``_scaled_mm`` (cuBLAS), SM100 only."""
    _check_blocked_gemm(qa, sa_blocked, qb, sb_blocked, None, out_dtype)
    _require_mx_gemm_device(qa.device)
    qa, qb = _fp8_gemm_layouts(qa, qb)
    out = torch._scaled_mm(qa, qb, _e8m0(sa_blocked), _e8m0(sb_blocked), out_dtype=torch.bfloat16)
    return out.to(out_dtype)
