"""``Config``: the one place every choice of the plugin is made, validated at construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mxfp8_compile.numerics import ScaleMode

TARGETS = ("auto", "sm100", "sm90", "emulated")
GEMM_ROLES = ("forward", "dgrad", "wgrad")
A2A_WGRAD_POLICIES = ("dequant", "requant", "bf16_a2a")
A2A_PAYLOADS = ("gemm_inputs", "all")
A2A_WIRE_FORMATS = ("mxint8", "mxfp8")
KEEP_BF16_ROLES = ("router", "lm_head")
OPERAND_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHT_BLOCKS = ("1x32", "32x32")


@dataclasses.dataclass(frozen=True)
class Config:
    """What the plugin converts to MXFP8 and how.

    scale_mode: ``"rceil"`` (default, as torchao MoE training) or ``"floor"``.
    target: ``"auto"`` (chosen from the device at compile time), ``"sm100"``, ``"sm90"`` or
        ``"emulated"`` (exact MX numerics anywhere, via bf16 GEMMs).
    gemms: which GEMMs of a layer to convert: any of ``"forward"``, ``"dgrad"``, ``"wgrad"``.
    dense_linears: convert dense ``mm``/``addmm`` (attention and shared-expert linears) too.
    include_fqns: if not empty, only GEMMs whose module FQN contains one of these substrings.
    exclude_fqns: GEMMs whose module FQN contains one of these substrings stay in bf16.
    keep_bf16_roles: modules whose GEMMs stay in bf16 for the part they play, read from the
        graph (``passes/module_roles.py``): ``"router"`` (its output picks experts: it reaches a
        top-k) and ``"lm_head"`` (named ``lm_head`` or ``output``, with only the loss after it).
        Both by default, as torchtitan's and torchao's MXFP8 recipes keep them.
    keep_bf16_modules: FQN components (``a.b.gate`` has ``gate``) whose GEMMs stay in bf16,
        whatever they do.
    min_gemm_size: GEMMs whose weight has fewer elements (K * N) stay in bf16.
    cost_model: convert a GEMM only where the target's cost model (``lowering/costs.py``,
        constants measured on the device it names) predicts its FP8 GEMM, with the casts it
        pays for, faster than its bf16 GEMM; the others stay bf16 as ``NOT_FASTER`` with the
        predicted ratio. On by default. ``False`` converts every GEMM the other rules allow (as
        the emulated target, the reference, always does: it has no cost model).
    operand_dtypes: operand dtypes that may be quantized; others stay as they are.
    fast_accum: on sm90, the GEMM roles (as in ``gemms``) whose FP8 GEMMs accumulate in Hopper's
        faster, less precise mode (``use_fast_accum``, no periodic promotion to fp32): all three
        by default, as torchao's FP8 rowwise grouped GEMM does. On an H200 that made a MoE layer
        step 1.07-1.11x faster and moved its output SQNR by 0.01 dB (benchmarks/RESULTS.md).
        ``True`` means every role, ``False`` or ``()`` none.
    a2a_wgrad: what happens to a weight-gradient GEMM whose token rows arrive through an
        all-to-all that the plugin moves quantization ahead of (expert parallel). The rows then
        travel as MXFP8 scaled along the hidden dim, but the wgrad contracts over tokens and
        needs blocks along tokens, which that layout cannot give. ``"dequant"`` (default, as
        torchao's ``wgrad_with_hp``): the wgrad runs in bf16 on the dequantized MX rows.
        ``"requant"``: the rows are dequantized and quantized again along tokens per group,
        and the wgrad stays MXFP8 (two roundings). ``"bf16_a2a"``: that all-to-all stays in
        bf16 and is not hoisted; the wgrad is converted as usual.
    a2a_payloads: which token all-to-alls carry 8-bit payloads. ``"gemm_inputs"`` (default):
        those whose rows feed converted GEMMs, as MXFP8, by moving the GEMMs' own quantization
        ahead (exact). ``"all"``: also the rest (the combine forward carries expert outputs, the
        dispatch backward token gradients), quantized before and dequantized after the
        collective in ``a2a_wire_format``: one more rounding of those tensors, for about half
        their bytes on the wire.
    a2a_wire_format: the format of the payloads that ``a2a_payloads="all"`` adds: ``"mxint8"``
        (default; int8 elements with an E8M0 scale per 32, OCP MXINT8: 41 dB round trip on
        Gaussian rows) or ``"mxfp8"`` (31.5 dB there, but relative precision for the small
        values of a block with an outlier). Both cost 33 bytes per 32 elements.
    weight_blocks: the scale blocks of weights cast for the forward and the dgrad. ``"1x32"``
        (default): MX blocks along each GEMM's contraction, a cast for each orientation.
        ``"32x32"``: one E8M0 scale per 32x32 tile (``numerics.to_mx_square``), so one cast's
        e4m3 bytes are MX along K for the forward and along N for the dgrad. Weights that are
        graph inputs (parameters) get it; a weight computed in the graph keeps 1x32. On the
        emulated target one cast serves both GEMMs; on sm90 each orientation is cast from the
        weight's tile scales, found once (as fast as 1x32 there, 0.91-1.02x on an H100: the
        rowwise rebase still needs each row's maxima, so the weight is read three times either
        way; the cost model prices these casts as 1x32's); sm100 refuses it (no kernels yet).
    gathered_casts: on sm90 and sm100, an activation that a token permutation produces (the
        forward's ``x[perm]``, the combine's gradient gathered in the backward) is cast by
        reading its source through the permutation (``passes/gathered_rows.py``), so that the
        permuted bf16 copy is never written. Off: the copy is written and read, as before (for
        comparison; the GEMMs give the same bits either way).
    sm100_ragged_groups: on sm100, hand torch's MX grouped GEMM the forward's and dgrad's token
        groups as they are (any sizes) instead of padded to multiples of 32 rows. Off by default:
        every MX 2d-3d run upstream (torch's tests, torchao) pads to 32, and ragged groups are
        unproven on hardware until ``python -m mxfp8_compile --selftest`` says this GPU runs
        them right. Padding costs one copy of the fp8 rows and of the output.
    """

    scale_mode: str = "rceil"
    target: str = "auto"
    gemms: tuple[str, ...] = GEMM_ROLES
    dense_linears: bool = True
    include_fqns: tuple[str, ...] = ()
    exclude_fqns: tuple[str, ...] = ()
    keep_bf16_roles: tuple[str, ...] = KEEP_BF16_ROLES
    keep_bf16_modules: tuple[str, ...] = ()
    min_gemm_size: int = 0
    cost_model: bool = True
    operand_dtypes: tuple[str, ...] = tuple(OPERAND_DTYPES)
    fast_accum: tuple[str, ...] | bool = GEMM_ROLES
    a2a_wgrad: str = "dequant"
    a2a_payloads: str = "gemm_inputs"
    a2a_wire_format: str = "mxint8"
    weight_blocks: str = "1x32"
    gathered_casts: bool = True
    sm100_ragged_groups: bool = False

    def __post_init__(self) -> None:
        _check_choice("scale_mode", self.scale_mode, tuple(m.value for m in ScaleMode))
        _check_choice("target", self.target, TARGETS)
        _check_choice("a2a_wgrad", self.a2a_wgrad, A2A_WGRAD_POLICIES)
        _check_choice("a2a_payloads", self.a2a_payloads, A2A_PAYLOADS)
        _check_choice("a2a_wire_format", self.a2a_wire_format, A2A_WIRE_FORMATS)
        _check_choice("weight_blocks", self.weight_blocks, WEIGHT_BLOCKS)
        if isinstance(self.fast_accum, bool):
            object.__setattr__(self, "fast_accum", GEMM_ROLES if self.fast_accum else ())
        for name in ("gemms", "include_fqns", "exclude_fqns", "keep_bf16_roles", "keep_bf16_modules",
                     "operand_dtypes", "fast_accum"):
            object.__setattr__(self, name, _as_str_tuple(name, getattr(self, name)))
        for name in ("gemms", "fast_accum"):
            for role in getattr(self, name):
                _check_choice(name, role, GEMM_ROLES)
        for keep in self.keep_bf16_roles:
            _check_choice("keep_bf16_roles", keep, KEEP_BF16_ROLES)
        for dtype in self.operand_dtypes:
            _check_choice("operand_dtypes", dtype, tuple(OPERAND_DTYPES))
        for name in ("dense_linears", "cost_model", "gathered_casts", "sm100_ragged_groups"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Config.{name} must be a bool, got {getattr(self, name)!r}")
        # bool is an int subclass: min_gemm_size=True would quietly mean 1
        if isinstance(self.min_gemm_size, bool) or not isinstance(self.min_gemm_size, int) or self.min_gemm_size < 0:
            raise ValueError(f"Config.min_gemm_size must be an int >= 0, got {self.min_gemm_size!r}")

    def allows_dtype(self, dtype: torch.dtype) -> bool:
        return any(OPERAND_DTYPES[name] == dtype for name in self.operand_dtypes)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, base: Config | None = None) -> Config:
        """A Config from ``torch.compile(..., options={...})``: keys are Config field names."""
        base = base or cls()
        options = dict(options or {})
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in fields:
                raise ValueError(
                    f"unknown mxfp8 option {key!r}; allowed options: {', '.join(fields)}"
                )
        return dataclasses.replace(base, **options)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"Config.{name}: {value!r} is not allowed; allowed values: "
            + ", ".join(repr(a) for a in allowed)
        )


def _as_str_tuple(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"Config.{name} must be a sequence of strings, got {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"Config.{name} must hold strings, got {item!r}")
    return items
