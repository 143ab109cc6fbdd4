"""Which implementation of the MX GEMMs a compilation targets.

Decided at compile time from the device of the graph's GEMM operands, never at import.

=========  ==========================================================================
emulated   anywhere: dequantize exactly to bf16, then the bf16 GEMM (the reference)
sm90       H100/H200: rowwise rebase, then FP8 rowwise ``_scaled_grouped_mm``/``_scaled_mm``
sm100      B200/GB200/B300 (capability 10.x): ``_scaled_grouped_mm``/``_scaled_mm`` with
           e8m0 scales in the blocked layout; contract-tested on fake tensors, never run here
=========  ==========================================================================
"""

from __future__ import annotations

import torch

from mxfp8_compile.config import Config

SM90 = (9, 0)
# torch's MX grouped GEMM runs on compute capability 10.x only: ``_scaled_grouped_mm`` admits
# majors 9 and 10 (``_scaled_mm_allowed_device(sm90_only, sm100_only)``), its MX kernel is
# FBGEMM's SM100 CUTLASS kernel, and on SM90 that launch kills the CUDA context. SM 11/12
# (Thor, consumer Blackwell) are refused by torch, so they stay off this target too.
SM100_MAJOR = 10

# What a forced target needs, and the devices that have it (for the error message).
_NEEDS = {
    "sm90": "an SM90 GPU (H100, H200)",
    "sm100": "an SM100 GPU (B200, GB200, B300: compute capability 10.x)",
}


def device_capability(device: torch.device | None) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None elsewhere. Tests monkeypatch this."""
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def has_mx_gemm(capability: tuple[int, int] | None) -> bool:
    """Whether torch's MX GEMMs (e8m0 blocked scales) may be launched at this capability."""
    return capability is not None and capability[0] == SM100_MAJOR


def _runs_on(target: str, capability: tuple[int, int] | None) -> bool:
    if target == "sm90":
        return capability == SM90
    if target == "sm100":
        return has_mx_gemm(capability)
    return True


def select_target(config: Config, device: torch.device | None) -> str:
    """The target for a graph whose GEMM operands live on ``device``.

    ``auto`` picks ``sm100`` on capability 10.x, ``sm90`` on SM90 (where torch's MX grouped
    GEMM must never be launched: it kills the CUDA context below SM100) and ``emulated``
    elsewhere, or wherever torch lacks ``_scaled_grouped_mm``. A forced target the device cannot
    run raises ``ValueError`` naming the device, its capability and the alternatives.
    """
    capability = device_capability(device)
    if config.target == "auto":
        fast = [t for t in ("sm100", "sm90") if _runs_on(t, capability)]
        return fast[0] if fast and hasattr(torch, "_scaled_grouped_mm") else "emulated"
    if not _runs_on(config.target, capability):
        where = f"{device} (capability {capability})" if capability else str(device)
        raise ValueError(
            f"Config(target={config.target!r}) needs {_NEEDS[config.target]}; this graph's GEMMs "
            f"run on {where}. Use target='auto' or 'emulated'."
        )
    return config.target
