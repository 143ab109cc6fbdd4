"""Which implementation of the MX GEMMs a compilation targets, and the shapes each can take.

Decided at compile time from the device of the graph's GEMM operands, never at import.

=========  ==========================================================================
emulated   anywhere: dequantize exactly to bf16, then the bf16 GEMM (the reference)
sm90       H100/H200: rowwise rebase, then FP8 rowwise ``_scaled_grouped_mm``/``_scaled_mm``
sm100      B200/GB200 (capability 10.0), and B300 (10.3) once the self-check passed on it:
           ``_scaled_grouped_mm``/``_scaled_mm`` with e8m0 scales in the blocked layout;
           contract-tested on fake tensors, never run here
=========  ==========================================================================

The capabilities, from torch 2.11's CUDA wheel: ``_scaled_grouped_mm`` admits majors 9 and 10
only (``_scaled_mm_allowed_device(sm90_only, sm100_only)``), so SM 11/12 (Thor, consumer
Blackwell) are refused by torch itself. Its MX grouped GEMM (MSLK's CUTLASS kernel) has real code
in the wheel's ``sm_100a`` and ``sm_103a`` cubins and stubs elsewhere; on SM90 that launch kills
the CUDA context. 10.0 is where torchao runs this path; 10.3 has the kernels but no run we know
of, so it takes sm100 only after ``python -m mxfp8_compile --selftest`` passed on it, which
leaves a record (``selftest_record``). The rowwise FP8 grouped GEMM has real code only in the
``sm_90a`` cubin, so sm90 is SM90 only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from mxfp8_compile.config import Config

SM90 = (9, 0)
# Capabilities torch's MX kernels are built for: proven ones, and ones that run only after the
# self-check passed on them.
SM100_PROVEN = ((10, 0),)
SM100_UNPROVEN = ((10, 3),)

# What a forced target needs, and the devices that have it (for the error message).
_NEEDS = {
    "sm90": "an SM90 GPU (H100, H200)",
    "sm100": "an SM100 GPU (B200, GB200: compute capability 10.0; B300, 10.3, after the self-check)",
}
_SELFTEST = "python -m mxfp8_compile --selftest"

# Shape rules of the GEMMs that sm90 and sm100 launch, checked by torch 2.11's C++ at run time
# and not by the meta function of ``_scaled_grouped_mm`` (so fake tensors cannot catch them):
# both operands' dims other than A's rows multiples of 16 ("Expected mat_b shape to be divisible
# by 16", "Expected trailing dimension of mat_a to be divisible by 16"; ``_scaled_mm``: "mat2
# shape (KxN) must be divisible by 16"). The contraction is a multiple of 32 already (the MX
# block, or the wgrad's token groups padded to 32), so what is left is B's last dim: the output
# columns. The SM90 grouped kernel refuses 1024 groups or more; MSLK's launches a block of one
# thread per group, at most 1024.
OUTPUT_COLUMNS_MULTIPLE = 16
MAX_GROUPS = {"sm90": 1023, "sm100": 1024}


@dataclasses.dataclass(frozen=True)
class TargetChoice:
    """The target a graph compiles for, and why, in words the report prints."""

    target: str
    why: str


def device_capability(device: torch.device | None) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None elsewhere. Tests monkeypatch this."""
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def has_mx_gemm(capability: tuple[int, int] | None) -> bool:
    """Whether torch's MX GEMMs (e8m0 blocked scales) may be launched at this capability: one
    torch builds them for (the self-check runs them on an unproven one)."""
    return capability in SM100_PROVEN + SM100_UNPROVEN


def _refusal(target: str, capability: tuple[int, int] | None, config: Config) -> str | None:
    """Why ``target`` may not run at ``capability`` (None: it may)."""
    if target == "emulated":
        return None
    if _SELF_CHECKING.get() and (capability is None or capability in SM100_UNPROVEN):
        return None
    if capability is None:
        return "no CUDA device"
    if target == "sm90":
        return None if capability == SM90 else f"capability {capability}: torch's rowwise FP8 grouped GEMM is SM90 code"
    if capability in SM100_PROVEN:
        return None
    if capability in SM100_UNPROVEN:
        record = selftest_record(capability)
        mode = "ragged" if config.sm100_ragged_groups else "padded"
        if record and record.get(mode):
            return None
        return (f"capability {capability}: torch 2.11 has MX kernels for it, unproven until `{_SELFTEST}` passes "
                f"on this GPU ({'it failed' if record else 'not run'} for {mode} token groups)")
    return f"capability {capability}: torch's MX GEMMs run on 10.0 and 10.3 only"


def choose_target(config: Config, device: torch.device | None) -> TargetChoice:
    """The target for a graph whose GEMM operands live on ``device``, with the reason.

    ``auto`` picks ``sm100`` where torch's MX kernels are proven (or the self-check passed),
    ``sm90`` on SM90 (where torch's MX grouped GEMM must never be launched: it kills the CUDA
    context below SM100) and ``emulated`` elsewhere, or wherever torch lacks
    ``_scaled_grouped_mm``; the reason says why the faster targets were refused. A forced
    target the device cannot run raises ``ValueError`` naming the device, its capability, the
    reason and the alternatives.
    """
    capability = device_capability(device)
    if config.target == "auto":
        if capability is None:
            return TargetChoice("emulated", "auto: no CUDA device")
        if not hasattr(torch, "_scaled_grouped_mm"):
            return TargetChoice("emulated", f"auto: torch {torch.__version__} has no _scaled_grouped_mm")
        refusals = {t: _refusal(t, capability, config) for t in ("sm100", "sm90")}
        for target, refused in refusals.items():
            if refused is None:
                return TargetChoice(target, f"auto: {device} has capability {capability}")
        return TargetChoice("emulated", "auto: " + "; ".join(f"not {t}: {why}" for t, why in refusals.items()))
    refused = _refusal(config.target, capability, config)
    if refused is not None and capability is None and _PLANNING.get():
        return TargetChoice(config.target, f"Config(target={config.target!r}), planned on {device}: what "
                            f"{_NEEDS[config.target]} would get; nothing runs on a GPU")
    if refused is not None:
        where = f"{device} (capability {capability})" if capability else str(device)
        raise ValueError(
            f"Config(target={config.target!r}) needs {_NEEDS[config.target]}; this graph's GEMMs "
            f"run on {where}: {refused}. Use target='auto' or 'emulated'."
        )
    return TargetChoice(config.target, f"Config(target={config.target!r})")


# the targets whose casts implement each Config.weight_blocks
WEIGHT_BLOCK_TARGETS = {"1x32": ("sm100", "sm90", "emulated"), "32x32": ("sm90", "emulated")}


def check_weight_blocks(config: Config, choice: TargetChoice) -> None:
    """Raise ``ValueError`` if ``choice``'s target cannot cast weights in ``config.weight_blocks``
    (no silent fallback: another target or block shape changes speed or numerics)."""
    supported = WEIGHT_BLOCK_TARGETS[config.weight_blocks]
    if choice.target not in supported:
        raise ValueError(
            f"Config(weight_blocks={config.weight_blocks!r}) runs on the {' and '.join(supported)} "
            f"target{'s' * (len(supported) > 1)} only so far; "
            f"this graph's target is {choice.target} ({choice.why}). Use weight_blocks='1x32' there, "
            f"or target='emulated' to study the numerics."
        )


def select_target(config: Config, device: torch.device | None) -> str:
    """``choose_target``'s target."""
    return choose_target(config, device).target


def broken_rule(target: str, b_shape: tuple[int | torch.SymInt, ...], groups: int | None) -> str | None:
    """The first shape rule of ``target``'s GEMM kernels that a GEMM with B of ``b_shape`` (.., K,
    N) over ``groups`` token groups (None: dense) breaks, in words that name it; None if none."""
    from mxfp8_compile.passes._graph import known_multiple

    if target not in MAX_GROUPS:
        return None
    columns = b_shape[-1]
    if not known_multiple(columns, OUTPUT_COLUMNS_MULTIPLE):
        known = "unknown at compile time" if isinstance(columns, torch.SymInt) else "not a multiple of 16"
        return (f"output columns N={columns} {known}: torch's {target} FP8 GEMMs need N % 16 == 0 "
                f"(\"Expected mat_b shape to be divisible by 16\")")
    if groups is not None and groups > MAX_GROUPS[target]:
        return f"{groups} groups: torch's {target} grouped GEMM takes at most {MAX_GROUPS[target]}"
    return None


# --------------------------------------------------------------------------------------------
# The self-check's record: which modes passed on an unproven capability.
# --------------------------------------------------------------------------------------------


_SELF_CHECKING = contextvars.ContextVar("mxfp8_self_check", default=False)
_PLANNING = contextvars.ContextVar("mxfp8_planning", default=False)


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """A forced sm90 or sm100 target is taken on a machine without a GPU (the graphs' tensors on
    the CPU): the passes plan for that GPU, and its ops run as their CPU emulations. For
    ``mxfp8-dump --target``; on a GPU that cannot run the target, the refusal stands."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


@contextlib.contextmanager
def self_check() -> Iterator[None]:
    """Within it a forced target compiles on an unproven capability (the self-check is what
    proves it) and on a CPU (the target's emulations: a check of the self-check itself). The
    sm100 GEMMs still refuse to launch where torch has no MX kernels."""
    token = _SELF_CHECKING.set(True)
    try:
        yield
    finally:
        _SELF_CHECKING.reset(token)


def _record_path(capability: tuple[int, int]) -> Path:
    root = os.environ.get("MXFP8_COMPILE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mxfp8_compile"
    cuda = torch.version.cuda or "none"
    return Path(root) / f"selftest-sm{capability[0]}{capability[1]}-torch{torch.__version__}-cuda{cuda}.json"


def selftest_record(capability: tuple[int, int]) -> dict[str, bool] | None:
    """What the self-check found on a GPU of ``capability`` with this torch: ``{"padded":
    bool, "ragged": bool}`` (sm100 with token groups padded to 32, or ragged), or None if it has
    not run. ``MXFP8_COMPILE_CACHE_DIR`` (default ``~/.cache/mxfp8_compile``) holds it."""
    try:
        return json.loads(_record_path(capability).read_text())
    except (OSError, ValueError):
        return None


def write_selftest_record(capability: tuple[int, int], passed: dict[str, bool]) -> Path:
    path = _record_path(capability)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(passed))
    return path
