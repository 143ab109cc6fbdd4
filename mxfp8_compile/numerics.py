"""The MX (OCP Microscaling) reference math in plain torch: the single source of truth.

Every kernel, template and target of this project is checked bit for bit against this module.
It runs on any device torch runs on; its quantization and layout functions never synchronize
with the host (the SQNR helpers return Python floats, so they do).

Format: ``float8_e4m3fn`` data and one power-of-two scale per 32 contiguous elements along one
dim. A scale is stored as its E8M0 byte ``b`` in a ``uint8`` tensor and means ``2**(b - 127)``;
byte 255 is NaN, there is no zero and no infinity. Scales stay ``uint8`` everywhere in this
project (CPU Inductor cannot materialize ``float8_e8m0fnu``, gloo rejects fp8, NCCL rejects
e8m0); they are viewed as ``float8_e8m0fnu`` only at an aten GEMM boundary.

Scale modes (torchao ``ScaleCalculationMode``, same semantics bit for bit):

* ``rceil`` (default, cuBLAS UE8M0 recipe): ``scale = round_up_to_pow2(amax * fp32(1/448))``;
  ``|x| / scale <= 448`` always, so nothing saturates.
* ``floor`` (OCP spec): ``scale = 2**(floor(log2(amax)) - 8)``; scaled values can land in
  [448, 512) and saturate to 448.

A block holding NaN or Inf gets byte 255 and an all-NaN data block; an all-zero block gets byte 0
and zero data.

MXINT8 (``to_mxint8``/``from_mxint8``, same scales and layouts, int8 data) is only the wire format
of the all-to-all payloads that no GEMM reads (``Config.a2a_wire_format``).

Layout conventions used by every function here and by ``mxfp8_compile.ops``:

* ``qdata`` has the shape of the input and is contiguous;
* ``scales`` has the shape of the input with the quantized dim divided by 32, and is contiguous;
* a GEMM operand is quantized along its contraction dim: dim -1 of A, dim -2 of B.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import torch

BLOCK_SIZE = 32
F8E4M3_MAX = 448.0
F8E4M3_MAX_POW2 = 8  # 2**8 = 256, the largest power of two <= 448
E8M0_BIAS = 127
E8M0_NAN = 255
F32_MANTISSA_BITS = 23

# The layout of SM100 block-scaling factors (cuBLAS "block scaling factors layout"): scales are
# cut into tiles of 128 rows x 4 columns, and each 512-byte tile is stored as (32, 16).
BLOCKED_TILE_ROWS = 128
BLOCKED_TILE_COLS = 4

HIGH_PRECISION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class ScaleMode(str, enum.Enum):
    """How a block's E8M0 scale is derived from its absolute maximum ``amax``.

    ``RCEIL``: ``amax * fp32(1/448)`` rounded up to a power of two (its fp32 exponent, plus one if
    any mantissa bit is set; fp32 subnormals round up only above 2**-127). Never saturates.
    ``FLOOR``: ``floor(log2(amax)) - 8``, clamped to the E8M0 range (the OCP MX v1.0 rule).
    Spec: https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf
    """

    RCEIL = "rceil"
    FLOOR = "floor"

    @classmethod
    def parse(cls, mode: str | ScaleMode) -> ScaleMode:
        try:
            return cls(mode)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown scale mode {mode!r}; allowed: {allowed}") from None


# --------------------------------------------------------------------------------------------
# Validation shared by the reference functions and the custom ops' fake implementations.
# --------------------------------------------------------------------------------------------


def check_high_precision(name: str, x: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``x`` is a bf16, fp16 or fp32 tensor."""
    if x.dtype not in HIGH_PRECISION_DTYPES:
        raise TypeError(
            f"{name} must be bfloat16, float16 or float32 to be quantized to MXFP8, got {x.dtype} "
            f"(shape {tuple(x.shape)}); cast it first"
        )


def check_block_dim(name: str, x: torch.Tensor, dim: int) -> int:
    """Normalize ``dim`` and raise ``ValueError`` unless ``x.shape[dim]`` is a multiple of 32."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dim to be quantized, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for {name} of shape {tuple(x.shape)}")
    dim %= x.dim()
    if x.shape[dim] % BLOCK_SIZE != 0:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} cannot be quantized along dim {dim}: its size "
            f"{x.shape[dim]} is not a multiple of the MX block size {BLOCK_SIZE}"
        )
    return dim


def check_offsets(name: str, offs: torch.Tensor) -> None:
    """Raise unless ``offs`` is a 1D int32 tensor of group end offsets."""
    if offs.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 group end offsets, got {offs.dtype}")
    if offs.dim() != 1:
        raise ValueError(
            f"{name} must be 1D (one end offset per group), got shape {tuple(offs.shape)}"
        )


def check_tokens(name: str, x: torch.Tensor) -> None:
    """Raise unless ``x`` is 2D, (tokens, features), as the token-group casts take it."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2D (tokens, features), got shape {tuple(x.shape)}")


def check_gather(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Raise unless ``(src, rows, weights)`` are the arguments ``gather_rows`` takes: ``src`` (T,
    K) high precision, ``rows`` (M,) int32 or int64, ``weights`` None or (M,) high precision."""
    check_high_precision("src", src)
    check_tokens("src", src)
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be a 1D int32 or int64 index, got {rows.dtype} {tuple(rows.shape)}")
    if weights is not None:
        check_high_precision("weights", weights)
        if weights.shape != rows.shape:
            raise ValueError(f"weights must be one per gathered row, {tuple(rows.shape)}, got {tuple(weights.shape)}")


def gather_rows(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``src[rows]``, each row times its entry of ``weights`` if given: the (M, K) operand a
    token permutation produces (a gather; in the combine's backward, a gather times the routing
    weight), as the casts that read ``src`` through ``rows`` see it.

    ``src`` (T, K) bf16/fp16/fp32; ``rows`` (M,) int32/int64, negative entries counted from the
    end as indexing counts them; ``weights`` (M,) bf16/fp16/fp32. The product is taken in fp32
    and rounded once to ``src``'s dtype: what an eager or Inductor ``mul`` of these dtypes
    computes when its result has ``src``'s dtype (a bf16 ``mul``, or an fp32 one cast back).
    """
    check_gather(src, rows, weights)
    x = src[rows]
    if weights is None:
        return x
    return (x.float() * weights.float()[:, None]).to(src.dtype)


def check_square(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` (.., R, C) can be cast in 32x32 tiles: a high-precision
    dtype, R and C multiples of 32."""
    check_high_precision(name, x)
    for dim in (-2, -1):
        check_block_dim(name, x, dim)


def check_tile_scales(x: torch.Tensor, tile_scales: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``tile_scales`` can be x's 32x32 tile scales: uint8
    (.., R/32, C/32) for x (.., R, C)."""
    want = (*x.shape[:-2], x.shape[-2] // BLOCK_SIZE, x.shape[-1] // BLOCK_SIZE)
    if tuple(tile_scales.shape) != want or tile_scales.dtype != torch.uint8:
        raise ValueError(f"tile_scales of x {tuple(x.shape)} must be uint8 {want}, "
                         f"got {tile_scales.dtype} {tuple(tile_scales.shape)}")


def check_qdata(
    name: str, qdata: torch.Tensor, scales: torch.Tensor, dim: int, data_dtype: torch.dtype = torch.float8_e4m3fn
) -> int:
    """Check an MX pair: ``qdata`` of ``data_dtype`` (e4m3 for MXFP8, int8 for MXINT8), uint8
    ``scales`` whose shape is qdata's with dim / 32."""
    if qdata.dtype != data_dtype:
        raise TypeError(f"{name} data must be {str(data_dtype).removeprefix('torch.')}, got {qdata.dtype}")
    if scales.dtype != torch.uint8:
        raise TypeError(
            f"{name} scales must be uint8 E8M0 bytes, got {scales.dtype}"
            + (" (view float8_e8m0fnu scales as torch.uint8)" if scales.dtype.itemsize == 1 else "")
        )
    dim = check_block_dim(f"{name} data", qdata, dim)
    expected = list(qdata.shape)
    expected[dim] //= BLOCK_SIZE
    if list(scales.shape) != expected:
        raise ValueError(
            f"{name} scales have shape {tuple(scales.shape)}, expected {tuple(expected)}: one "
            f"scale per {BLOCK_SIZE} elements along dim {dim} of data of shape "
            f"{tuple(qdata.shape)}"
        )
    return dim


# --------------------------------------------------------------------------------------------
# E8M0 scale arithmetic.
# --------------------------------------------------------------------------------------------


def e8m0_rceil(descale: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``descale`` up to a power of two and return its E8M0 byte (uint8).

    Non-finite input gives 255. For fp32 subnormals, byte 0 already means 2**-127, so only values
    above 2**-127 (mantissa > 0x400000) round up to byte 1.
    """
    bits = descale.to(torch.float32).view(torch.int32)
    biased_exponent = (bits >> F32_MANTISSA_BITS) & 0xFF
    mantissa = bits & 0x7FFFFF
    up = torch.where(biased_exponent == 0, mantissa > 0x400000, mantissa != 0)
    byte = biased_exponent + up.to(torch.int32)
    return torch.where(torch.isfinite(descale), byte, E8M0_NAN).to(torch.uint8)


def e8m0_floor(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 byte of ``2**(floor(log2(amax)) - 8)`` for fp32 ``amax``, clamped; non-finite -> 255.

    The exponent is read from the fp32 bits, so zeros and subnormals give byte 0.
    """
    bits = amax.to(torch.float32).view(torch.int32)
    unbiased = ((bits >> F32_MANTISSA_BITS) & 0xFF) - E8M0_BIAS - F8E4M3_MAX_POW2
    byte = unbiased.clamp(-E8M0_BIAS, E8M0_BIAS + 1) + E8M0_BIAS
    return torch.where(torch.isfinite(amax), byte, E8M0_NAN).to(torch.uint8)


def e8m0_to_fp32(scales: torch.Tensor) -> torch.Tensor:
    """The fp32 value ``2**(b - 127)`` of each E8M0 byte; NaN for byte 255.

    Byte 0 (2**-127) is an fp32 subnormal and is built from its bits, since fp32 exponent
    arithmetic cannot reach it.
    """
    b = scales.to(torch.int32)
    bits = torch.where(b == 0, 0x00400000, b << F32_MANTISSA_BITS)
    bits = torch.where(b == E8M0_NAN, 0x7FC00000, bits)
    return bits.view(torch.float32)


def e8m0_reciprocal(scales: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` in fp32, exactly: the E8M0 byte ``254 - b`` decoded; NaN for byte 255."""
    b = scales.to(torch.int32)
    return e8m0_to_fp32(torch.where(b == E8M0_NAN, E8M0_NAN, 2 * E8M0_BIAS - b))


def _block_scales(amax: torch.Tensor, mode: ScaleMode) -> torch.Tensor:
    if mode is ScaleMode.RCEIL:
        # Multiply by the fp32-rounded reciprocal of 448, as torchao and cuBLAS do (not divide).
        return e8m0_rceil(amax * (1.0 / F8E4M3_MAX))
    return e8m0_floor(amax)


# --------------------------------------------------------------------------------------------
# Quantize and dequantize.
# --------------------------------------------------------------------------------------------


def to_mx(
    x: torch.Tensor, *, dim: int = -1, mode: str | ScaleMode = ScaleMode.RCEIL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to MXFP8 in blocks of 32 along ``dim``.

    Input: ``x`` bf16, fp16 or fp32, any shape and strides, ``x.shape[dim] % 32 == 0``.
    Output: ``(qdata, scales)``: ``qdata`` float8_e4m3fn of ``x.shape``; ``scales`` uint8 of
    ``x.shape`` with ``dim`` divided by 32; both contiguous.
    """
    check_high_precision("x", x)
    dim = check_block_dim("x", x, dim)
    mode = ScaleMode.parse(mode)
    rows = x.movedim(dim, -1)
    blocks = rows.reshape(*rows.shape[:-1], rows.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    blocks = blocks.to(torch.float32)
    # amax propagates NaN; an Inf makes the block non-finite too, and both give byte 255.
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scales = _block_scales(amax, mode)
    scaled = blocks * e8m0_reciprocal(scales)
    # The explicit clamp is torch 2.13's saturating cast, also on torch 2.11 (whose eager cast
    # turns overflow into NaN). Only FLOOR can exceed 448; NaN passes through clamp.
    qdata = scaled.clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    qdata = qdata.reshape(rows.shape).movedim(-1, dim).contiguous()
    return qdata, scales.squeeze(-1).movedim(-1, dim).contiguous()


def from_mx(
    qdata: torch.Tensor,
    scales: torch.Tensor,
    *,
    dim: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize an MX pair quantized along ``dim``: ``qdata * 2**(scale - 127)``.

    Computed in fp32 (exact, but for products below fp32's subnormal range), then cast to
    ``dtype``. Blocks with scale byte 255 are NaN.
    """
    dim = check_qdata("qdata", qdata, scales, dim)
    scale = e8m0_to_fp32(scales).repeat_interleave(BLOCK_SIZE, dim=dim)
    return (qdata.to(torch.float32) * scale).to(dtype)


def to_mx_square(
    x: torch.Tensor, *, mode: str | ScaleMode = ScaleMode.RCEIL, tile_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (.., R, C) to MXFP8 with one scale per 32 x 32 tile of its last two dims.

    Every 1 x 32 block along dim -1 and every 32 x 1 block along dim -2 lies in one tile, so the
    same e4m3 bytes are an MX tensor along either dim (``square_scales_along``): a weight cast
    once serves the forward (contraction along K) and the dgrad (along N). The scale is the
    tile's, from its amax as ``to_mx``'s from a block's; a tile holding NaN or Inf gets byte 255.
    ``tile_scales`` (.., R/32, C/32) uint8, if given, are used instead of x's own: x's, known from
    an earlier cast (of x's transpose, whose tile scales are these transposed), so that a second
    cast need not find the tile maxima again.
    Output: ``(qdata, tile_scales)``: ``qdata`` float8_e4m3fn of ``x.shape``; ``tile_scales``
    uint8 (.., R/32, C/32); both contiguous. R and C must be multiples of 32.
    """
    check_square("x", x)
    mode = ScaleMode.parse(mode)
    *lead, rows, cols = x.shape
    tiles = x.to(torch.float32).reshape(*lead, rows // BLOCK_SIZE, BLOCK_SIZE, cols // BLOCK_SIZE, BLOCK_SIZE)
    if tile_scales is None:
        scales = _block_scales(tiles.abs().amax(dim=(-3, -1), keepdim=True), mode)
    else:
        check_tile_scales(x, tile_scales)
        scales = tile_scales[..., :, None, :, None]
    qdata = (tiles * e8m0_reciprocal(scales)).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return qdata.reshape(x.shape).contiguous(), scales.squeeze(-1).squeeze(-2).contiguous()


def square_scales_along(tile_scales: torch.Tensor, dim: int) -> torch.Tensor:
    """The per-block scales (``to_mx``'s layout) of a ``to_mx_square`` tensor read as MX blocks
    along ``dim`` (-1 or -2): each tile's scale repeated for the 32 blocks it holds."""
    if dim not in (-1, -2):
        raise ValueError(f"square tiles are MX blocks along dim -1 or -2, not {dim}")
    return tile_scales.repeat_interleave(BLOCK_SIZE, dim=-1 if dim == -2 else -2).contiguous()


def mx_error_bound(
    x: torch.Tensor, *, dim: int = -1, mode: str | ScaleMode = ScaleMode.RCEIL
) -> torch.Tensor:
    """Per-element bound on ``|from_mx(to_mx(x, dim=dim, mode=mode)) - x|`` for finite ``x``.

    With block scale ``S``: a value in e4m3's normal range keeps 3 mantissa bits, so it errs by
    at most ``2**-4 * |x|``; one in the subnormal range by half a step, ``2**-10 * S``, and
    ``S < max(amax / 224, 2**-127)`` in both modes (the smallest scale is 2**-127). FLOOR scales
    leave ``|x| / S`` in [448, 512) for the block maximum, which saturates to 448: an error
    below ``|x| / 8``.
    """
    dim = check_block_dim("x", x, dim)
    relative = 2.0**-3 if ScaleMode.parse(mode) is ScaleMode.FLOOR else 2.0**-4
    rows = x.to(torch.float64).abs().movedim(dim, -1)
    blocks = rows.reshape(*rows.shape[:-1], -1, BLOCK_SIZE)
    largest_scale = (blocks.amax(dim=-1, keepdim=True) / 224.0).clamp(min=2.0**-127)
    bound = torch.maximum(blocks * relative, largest_scale * 2.0**-10)
    return bound.reshape(rows.shape).movedim(-1, dim)


# --------------------------------------------------------------------------------------------
# MXINT8 (OCP MX v1.0): the wire format of the all-to-all payloads that no GEMM reads.
# --------------------------------------------------------------------------------------------

MXINT8_FRACTION_BITS = 6  # an element q means q * 2**-6: two's complement fixed point 1.6
MXINT8_MAX = 127  # -128 is left unused, so that the range is symmetric


def to_mxint8(x: torch.Tensor, *, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to MXINT8 in blocks of 32 along ``dim``: int8 elements ``q`` meaning
    ``q * 2**-6 * scale``, one E8M0 scale per block.

    Scale: ``amax * fp32(64/127)`` rounded up to a power of two (``e8m0_rceil``, the RCEIL rule
    of MXFP8 with 127/64 in place of 448), so ``|x| / scale * 64`` stays within 127 (within
    127.5 whatever the product's rounding: nothing saturates). Elements: ``x / scale * 64``
    rounded half to even. A zero block gets byte 0, a block holding NaN or Inf byte 255 and
    zero data (NaN when dequantized). Each element keeps 7 bits relative to its block's
    maximum, where e4m3 keeps 3 relative to itself: more signal for data spread evenly within
    blocks, less for the small values of a block with an outlier (they round to zero).

    Input: ``x`` bf16, fp16 or fp32, ``x.shape[dim] % 32 == 0``. Output: ``(qdata int8,
    scales uint8)`` laid out as ``to_mx``'s.
    """
    check_high_precision("x", x)
    dim = check_block_dim("x", x, dim)
    rows = x.movedim(dim, -1)
    blocks = rows.reshape(*rows.shape[:-1], rows.shape[-1] // BLOCK_SIZE, BLOCK_SIZE).to(torch.float32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scales = e8m0_rceil(amax * (2.0**MXINT8_FRACTION_BITS / MXINT8_MAX))
    # two exact power-of-two products: 1/scale * 64 would overflow fp32 for the smallest scales
    q = torch.round(blocks * e8m0_reciprocal(scales) * 2.0**MXINT8_FRACTION_BITS)
    q = torch.where(scales == E8M0_NAN, 0.0, q)  # NaN cannot be an int8; the scale byte carries it
    qdata = q.to(torch.int8).reshape(rows.shape).movedim(-1, dim).contiguous()
    return qdata, scales.squeeze(-1).movedim(-1, dim).contiguous()


def from_mxint8(
    qdata: torch.Tensor, scales: torch.Tensor, *, dim: int = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize an MXINT8 pair quantized along ``dim``: ``qdata * 2**-6 * 2**(scale - 127)``,
    exact in fp32 (the smallest product, 2**-133, is an fp32 subnormal), then cast to
    ``dtype``. Blocks with scale byte 255 are NaN."""
    dim = check_qdata("qdata", qdata, scales, dim, torch.int8)
    scale = e8m0_to_fp32(scales).repeat_interleave(BLOCK_SIZE, dim=dim)
    return (qdata.to(torch.float32) * 2.0**-MXINT8_FRACTION_BITS * scale).to(dtype)


# --------------------------------------------------------------------------------------------
# Quantization along tokens, per group (the weight-gradient GEMM contracts over tokens).
# --------------------------------------------------------------------------------------------


def padded_rows_bound(rows: int, groups: int, multiple: int) -> int:
    """Static upper bound of ``sum_g round_up(size_g, multiple)`` for ``groups`` groups of
    ``rows`` rows in total: every group adds at most ``multiple - 1`` rows of padding."""
    return (rows + (multiple - 1) * groups) // multiple * multiple


def group_sizes(ends: torch.Tensor) -> torch.Tensor:
    """Sizes of the groups whose end offsets are ``ends`` (the first starts at 0)."""
    return torch.diff(ends, prepend=ends.new_zeros(1))


def padded_group_offsets(offs: torch.Tensor, multiple: int = BLOCK_SIZE) -> torch.Tensor:
    """End offsets (int32) of the groups after padding each to a multiple of ``multiple``.

    Computed on the device: no host synchronization.
    """
    check_offsets("offs", offs)
    return torch.cumsum(round_up(group_sizes(offs), multiple), 0, dtype=torch.int32)


def _padded_groups(ends: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sizes, padded_starts, padded_ends)`` of groups padded to multiples of ``multiple``."""
    sizes = group_sizes(ends)
    padded_ends = padded_group_offsets(ends, multiple)
    return sizes, padded_ends - round_up(sizes, multiple), padded_ends


def pad_token_groups(
    x: torch.Tensor, offs: torch.Tensor, multiple: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy each token group of ``x`` (rows ``[offs[g-1], offs[g])``) to a row offset that is a
    multiple of ``multiple``, zero-filling the gaps.

    Input: ``x`` (M, K); ``offs`` int32 (G,) non-decreasing with ``offs[-1] <= M`` (not checked:
    that would synchronize); rows past ``offs[-1]`` belong to no group and are dropped.
    Output: ``(padded, padded_offs)``: ``padded`` (padded_rows_bound(M, G, multiple), K) of x's
    dtype, zero outside the groups; ``padded_offs`` int32 (G,).
    """
    check_offsets("offs", offs)
    check_tokens("x", x)
    out_rows = padded_rows_bound(x.shape[0], offs.shape[0], multiple)
    sizes, padded_starts, padded_offs = _padded_groups(offs, multiple)
    if offs.shape[0] == 0 or x.shape[0] == 0:
        return x.new_zeros(out_rows, x.shape[1]), padded_offs
    row = torch.arange(out_rows, device=x.device, dtype=torch.int32)
    group, valid = group_of(row, padded_offs)
    local = row - padded_starts[group]
    valid &= local < sizes[group]
    source = (offs - sizes)[group] + local
    gathered = x[torch.where(valid, source, 0).long()]
    return torch.where(valid[:, None], gathered, 0).to(x.dtype), padded_offs


def unpad_token_groups(padded: torch.Tensor, offs: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of ``pad_token_groups``: the ``rows`` rows of each group, back from the row
    offsets padding gave them. ``padded`` (Mp, N) laid out as ``pad_token_groups(x, offs,
    32)`` lays out x; ``offs`` the groups' end offsets before padding. Rows past ``offs[-1]``
    belong to no group and come back zero. Output (rows, N) of ``padded``'s dtype."""
    check_offsets("offs", offs)
    sizes, padded_starts, _ = _padded_groups(offs, BLOCK_SIZE)
    row = torch.arange(rows, device=padded.device, dtype=torch.int32)
    group, valid = group_of(row, offs)
    if offs.shape[0] == 0 or padded.shape[0] == 0:
        return padded.new_zeros(rows, *padded.shape[1:])
    source = padded_starts[group] + row - (offs - sizes)[group]
    gathered = padded[torch.where(valid, source, 0).long()]
    return torch.where(valid.view(-1, *([1] * (padded.dim() - 1))), gathered, 0).to(padded.dtype)


def to_mx_token_groups(
    x: torch.Tensor, offs: torch.Tensor, *, mode: str | ScaleMode = ScaleMode.RCEIL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (M, K) along tokens (dim 0), per group: blocks never cross a group.

    Each group is zero-padded to a multiple of 32 rows (``pad_token_groups``), so every block
    of 32 rows lies in one group; padding blocks are zero with scale byte 0. Empty groups,
    1-token groups and any total M work.
    Output: ``(qdata (Mp, K) e4m3, scales (Mp/32, K) uint8, padded_offs (G,) int32)`` with
    ``Mp = padded_rows_bound(M, G, 32)``.
    """
    check_high_precision("x", x)
    padded, padded_offs = pad_token_groups(x, offs)
    qdata, scales = to_mx(padded, dim=0, mode=mode)
    return qdata, scales, padded_offs


# --------------------------------------------------------------------------------------------
# SM100 blocked ("swizzled" 128x4) scale layout.
# --------------------------------------------------------------------------------------------


def round_up(n: int | torch.Tensor, multiple: int) -> int | torch.Tensor:
    """``n`` rounded up to a multiple of ``multiple``, for ints and integer tensors alike."""
    return (n + multiple - 1) // multiple * multiple


def pad_to_block(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A new tensor: ``x`` with zeros appended along ``dim`` up to a multiple of ``BLOCK_SIZE``.

    For a GEMM's contraction dim, padding both operands so is exact: the zeros add nothing to
    any dot product, and an all-zero MX block has scale byte 0 and zero data."""
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim] = round_up(shape[dim], BLOCK_SIZE)
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def blocked_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the padded scale matrix the blocked layout of ``(rows, cols)`` scales fills."""
    return round_up(rows, BLOCKED_TILE_ROWS), round_up(cols, BLOCKED_TILE_COLS)


def blocked_offset(
    row: torch.Tensor, col: torch.Tensor, padded_cols: int | torch.Tensor
) -> torch.Tensor:
    """Flat offset of element (row, col) in ``to_blocked`` of a matrix ``padded_cols`` wide.

    128x4 tiles in row-block-major order (tile ``(row // 128) * (padded_cols // 4) + col // 4``),
    each 512-byte tile stored as (32, 16): tile element (r, c) at ``(r % 32) * 16 + (r // 32) * 4
    + c``. See https://docs.nvidia.com/cuda/cublas/#d-block-scaling-factors-layout
    """
    n_col_blocks = padded_cols // BLOCKED_TILE_COLS
    tile = (row // BLOCKED_TILE_ROWS) * n_col_blocks + col // BLOCKED_TILE_COLS
    r, c = row % BLOCKED_TILE_ROWS, col % BLOCKED_TILE_COLS
    return tile * (BLOCKED_TILE_ROWS * BLOCKED_TILE_COLS) + (r % 32) * 16 + (r // 32) * 4 + c


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Rearrange (..., rows, cols) scale matrices into the SM100 blocked layout.

    Each matrix is zero-padded to ``blocked_shape(rows, cols)`` and its bytes are reordered as
    ``blocked_offset`` says. Output: contiguous (..., *blocked_shape(rows, cols)) uint8 whose
    last two dims hold one matrix's blocked bytes in flat order.
    """
    if scales.dim() < 2:
        raise ValueError(f"scales must be (..., rows, cols), got shape {tuple(scales.shape)}")
    *batch, rows, cols = scales.shape
    padded_rows, padded_cols = blocked_shape(rows, cols)
    padded = scales.new_zeros(*batch, padded_rows, padded_cols)
    padded[..., :rows, :cols] = scales
    n_row_blocks = padded_rows // BLOCKED_TILE_ROWS
    n_col_blocks = padded_cols // BLOCKED_TILE_COLS
    # (..., rb, r_hi, r_lo, cb, c) with row = 128 rb + 32 r_hi + r_lo -> (..., rb, cb, r_lo, r_hi, c)
    tiles = padded.view(*batch, n_row_blocks, 4, 32, n_col_blocks, BLOCKED_TILE_COLS)
    nb = len(batch)
    tiles = tiles.permute(*range(nb), nb, nb + 3, nb + 2, nb + 1, nb + 4)
    return tiles.reshape(*batch, padded_rows, padded_cols).contiguous()


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``to_blocked`` for one matrix: the (rows, cols) scales from its blocked bytes."""
    padded_rows, padded_cols = blocked_shape(rows, cols)
    if blocked.numel() != padded_rows * padded_cols:
        raise ValueError(
            f"blocked scales of {blocked.numel()} bytes cannot hold a ({rows}, {cols}) scale "
            f"matrix: its blocked layout has {padded_rows * padded_cols}"
        )
    n_row_blocks = padded_rows // BLOCKED_TILE_ROWS
    n_col_blocks = padded_cols // BLOCKED_TILE_COLS
    tiles = blocked.reshape(n_row_blocks, n_col_blocks, 32, 4, BLOCKED_TILE_COLS)
    padded = tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)
    return padded[:rows, :cols].contiguous()


def _scatter_with_sink(
    scales: torch.Tensor, flat: torch.Tensor, in_group: torch.Tensor, numel: int
) -> torch.Tensor:
    """Write ``scales`` to flat offsets ``flat`` of a zeroed buffer of ``numel`` bytes.

    Elements outside every group go to one extra sink byte that is dropped, instead of being
    masked out: boolean indexing would synchronize with the host.
    """
    out = scales.new_zeros(numel + 1)
    out[torch.where(in_group, flat, numel)] = scales
    return out[:numel]


def group_of(index: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group of each index given group end offsets (clamped into range), and whether it lies
    in any group. With no groups at all, every index maps to 0 and lies in none."""
    group = torch.searchsorted(ends, index, right=True)
    in_group = group < ends.shape[0]
    return group.clamp(max=max(ends.shape[0] - 1, 0)).long(), in_group


def to_blocked_m_groups(scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Blocked layout of the A-operand scales of a 2Dx3D grouped GEMM, one chunk per group.

    Input: ``scales`` (M, K/32) uint8 (rows are tokens); ``offs`` int32 (G,) token end offsets.
    Each group's rows are blocked on their own (rows padded to 128); group g's chunk starts at
    flat offset ``sum_{i<g} round_up(size_i, 128) * round_up(K/32, 4)`` (FBGEMM's
    ``set_stacked_kernel_args_kernel``). Offsets are computed on the device.
    Output: (padded_rows_bound(M, G, 128), round_up(K/32, 4)) uint8, zero where no scale lands.
    """
    check_offsets("offs", offs)
    rows, cols = scales.shape
    padded_cols = round_up(cols, BLOCKED_TILE_COLS)
    out_rows = padded_rows_bound(rows, offs.shape[0], BLOCKED_TILE_ROWS)
    if offs.shape[0] == 0:
        return scales.new_zeros(out_rows, padded_cols)
    sizes, chunk_starts, _ = _padded_groups(offs, BLOCKED_TILE_ROWS)
    group, in_group = group_of(torch.arange(rows, device=scales.device, dtype=torch.int32), offs)
    local_row = (torch.arange(rows, device=scales.device) - (offs - sizes)[group])[:, None]
    col = torch.arange(cols, device=scales.device)[None, :]
    flat = chunk_starts[group].long()[:, None] * padded_cols + blocked_offset(
        local_row, col, padded_cols
    )
    out = _scatter_with_sink(scales, flat, in_group[:, None], out_rows * padded_cols)
    return out.view(out_rows, padded_cols)


def to_blocked_k_groups(scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Blocked layout of the scales of one operand of a 2Dx2D (weight-gradient) grouped GEMM.

    Input: ``scales`` (R, Mp/32) uint8, rows the non-contraction dim and columns the token blocks
    of token groups padded to multiples of 32; ``offs`` int32 (G,) the padded token end offsets
    (multiples of 32, as ``to_mx_token_groups`` returns them).
    Group g's scale columns ``[offs[g-1]/32, offs[g]/32)`` are blocked on their own, columns
    padded to 4; its chunk starts at flat offset ``round_up(R, 128) * sum_{i<g} round_up(
    cols_i, 4)`` (FBGEMM). Output: (round_up(R, 128), padded_rows_bound(Mp/32, G, 4)) uint8.
    """
    check_offsets("offs", offs)
    rows, cols = scales.shape
    padded_rows = round_up(rows, BLOCKED_TILE_ROWS)
    out_cols = padded_rows_bound(cols, offs.shape[0], BLOCKED_TILE_COLS)
    if offs.shape[0] == 0:
        return scales.new_zeros(padded_rows, out_cols)
    col_ends = offs // BLOCK_SIZE
    col_sizes, chunk_starts, _ = _padded_groups(col_ends, BLOCKED_TILE_COLS)
    group_cols = round_up(col_sizes, BLOCKED_TILE_COLS)
    group, in_group = group_of(
        torch.arange(cols, device=scales.device, dtype=torch.int32), col_ends
    )
    local_col = (torch.arange(cols, device=scales.device) - (col_ends - col_sizes)[group])[None, :]
    row = torch.arange(rows, device=scales.device)[:, None]
    flat = chunk_starts[group].long()[None, :] * padded_rows + blocked_offset(
        row, local_col, group_cols[group].long()[None, :]
    )
    out = _scatter_with_sink(scales, flat, in_group[None, :], padded_rows * out_cols)
    return out.view(padded_rows, out_cols)


def undo_layout(
    layout: Callable[[torch.Tensor], torch.Tensor], blocked: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    """Inverse of a scale layout: the scales of ``shape`` that ``layout`` turned into ``blocked``.

    ``layout`` is ``to_blocked`` or ``to_blocked_m_groups`` / ``to_blocked_k_groups`` with their
    offsets bound (``functools.partial``); each moves every scale to a byte of its own and fills
    the rest with padding. Pushing the indices 1..n through the same ``layout`` therefore says
    where each scale went (padding reads index 0, a sink that is dropped), so the inverse is
    exact by construction and follows any change of the forward layout. Scales the layout
    drops (rows or token blocks past the last group) come back as byte 0.
    Output: ``shape``, ``blocked``'s dtype, contiguous.
    """
    count = math.prod(shape)
    index = torch.arange(1, count + 1, device=blocked.device).view(tuple(shape))
    slots = layout(index).flatten()
    if slots.numel() != blocked.numel():
        raise ValueError(
            f"blocked scales of shape {tuple(blocked.shape)} cannot hold {tuple(shape)} scales: "
            f"their layout has {slots.numel()} bytes"
        )
    out = blocked.new_zeros(count + 1)
    out[slots] = blocked.flatten()
    return out[1:].view(tuple(shape))


# --------------------------------------------------------------------------------------------
# SM90 rowwise rebase.
# --------------------------------------------------------------------------------------------


def rebase_rowwise(
    qdata: torch.Tensor, scales: torch.Tensor, *, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each contraction row one scale: shift its blocks to the row's largest block scale.

    For every row along ``dim`` (all blocks sharing the other indices), ``smax`` is the largest
    scale byte; block values become ``q * 2**(s - smax)`` rounded to e4m3 (an exact exponent
    change while the result stays in e4m3's normal range; smaller results round to its 2**-9
    subnormal grid, an absolute error of at most ``2**-10 * 2**(smax - 127)``).
    Output: ``(rebased e4m3 of qdata's shape, row_scales uint8)`` with ``row_scales`` of qdata's
    shape without ``dim``; ``rebased * 2**(row_scale - 127)`` approximates ``from_mx``.
    A row holding a NaN block (byte 255) gets row scale 255.
    """
    dim = check_qdata("qdata", qdata, scales, dim)
    row_scales = scales.amax(dim=dim)
    return _shift_to(qdata, scales, row_scales.unsqueeze(dim), dim), row_scales


def _shift_to(
    qdata: torch.Tensor, scales: torch.Tensor, target: torch.Tensor, dim: int
) -> torch.Tensor:
    """``qdata * 2**(scales - target)`` rounded to e4m3, scales broadcast along ``dim``."""
    shift = (scales.to(torch.int32) - target.to(torch.int32)).repeat_interleave(BLOCK_SIZE, dim)
    return torch.ldexp(qdata.to(torch.float32), shift.to(torch.float32)).to(torch.float8_e4m3fn)


def rebase_square(
    qdata: torch.Tensor, tile_scales: torch.Tensor, *, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SM90 rowwise rebase (``rebase_rowwise``) of a ``to_mx_square`` tensor read along ``dim``
    (-1 or -2): each contraction row's scale is the largest tile scale of its 32-row strip, so
    the row scales come from the tile grid, not from another read of the data."""
    return rebase_rowwise(qdata, square_scales_along(tile_scales, dim), dim=dim)


def rebase_token_groups(
    qdata: torch.Tensor, scales: torch.Tensor, padded_offs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rowwise rebase for an operand quantized along tokens per group (``to_mx_token_groups``).

    The contraction runs over the tokens of one group, so each (group, column) pair gets one
    scale: the largest block scale of that column within the group.
    Input: ``qdata`` (Mp, K) e4m3, ``scales`` (Mp/32, K) uint8, ``padded_offs`` (G,) int32.
    Output: ``(rebased (Mp, K) e4m3, group_scales (G, K) uint8)``; an empty group's scales are 0.
    """
    check_qdata("qdata", qdata, scales, 0)
    check_offsets("padded_offs", padded_offs)
    groups = padded_offs.shape[0]
    block = torch.arange(scales.shape[0], device=scales.device, dtype=torch.int32)
    # Blocks past the last group (trailing padding) fall in an extra group G, dropped below.
    group = torch.searchsorted(padded_offs // BLOCK_SIZE, block, right=True).long()
    group_scales = scales.new_zeros(groups + 1, scales.shape[1]).scatter_reduce(
        0, group[:, None].expand_as(scales), scales, "amax"
    )
    rebased = _shift_to(qdata, scales, group_scales[group], 0)
    return rebased, group_scales[:groups].contiguous()


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB (float64).

    ``inf`` when they are equal.
    """
    ref = reference.detach().to(torch.float64)
    noise = (ref - actual.detach().to(torch.float64)).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm() / noise))


def rebase_gemm_sqnr(
    a: torch.Tensor, b: torch.Tensor, *, mode: str | ScaleMode = ScaleMode.RCEIL
) -> float:
    """SQNR (dB) of the SM90 rebase against exact MX, measured on the GEMM ``a @ b``.

    Both operands are quantized to MX along the contraction dim (``a`` (M, K) along dim -1,
    ``b`` (K, N) along dim -2); the exact MX product and the product of the rebased operands
    with their row scales are computed in float64 and compared. This is the error the rebase
    adds on top of MX quantization, where it matters: in the dot products.
    """
    qa, sa = to_mx(a, dim=-1, mode=mode)
    qb, sb = to_mx(b, dim=-2, mode=mode)
    exact = from_mx(qa, sa, dim=-1, dtype=torch.float64) @ from_mx(qb, sb, dim=-2, dtype=torch.float64)
    ra, rsa = rebase_rowwise(qa, sa, dim=-1)
    rb, rsb = rebase_rowwise(qb, sb, dim=-2)
    rebased = (ra.to(torch.float64) * e8m0_to_fp32(rsa).to(torch.float64)[:, None]) @ (
        rb.to(torch.float64) * e8m0_to_fp32(rsb).to(torch.float64)[None, :]
    )
    return sqnr(exact, rebased)
