"""Which implementation of the MX GEMMs a compilation targets.

Decided at compile time from the device of the graph's GEMM operands, never at import.

=========  ==========================================================================
emulated   anywhere: dequantize exactly to bf16, then the bf16 GEMM (the reference)
sm90       H100/H200: rowwise rebase, then FP8 rowwise ``_scaled_grouped_mm``/``_scaled_mm``
sm100      B200+: ``_scaled_grouped_mm`` with e8m0 blocked scales (not implemented yet)
=========  ==========================================================================
"""

from __future__ import annotations

import torch

from mxfp8_compile.config import Config

SM90 = (9, 0)


def device_capability(device: torch.device | None) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None elsewhere. Tests monkeypatch this."""
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def select_target(config: Config, device: torch.device | None) -> str:
    """The target for a graph whose GEMM operands live on ``device``.

    ``auto`` picks ``sm90`` on SM90 (the MX grouped GEMM of torch is never launched there: it
    kills the CUDA context below SM100) and ``emulated`` elsewhere. A forced target the device
    cannot run raises ``ValueError``; ``sm100`` is not implemented yet (``NotImplementedError``).
    """
    capability = device_capability(device)
    if config.target == "auto":
        return "sm90" if capability == SM90 and hasattr(torch, "_scaled_grouped_mm") else "emulated"
    if config.target == "sm90" and capability != SM90:
        where = f"{device} (capability {capability})" if capability else str(device)
        raise ValueError(
            f"Config(target='sm90') needs an SM90 GPU (H100, H200); this graph's GEMMs run on "
            f"{where}. Use target='auto' or 'emulated'."
        )
    if config.target == "sm100":
        raise NotImplementedError(
            "target 'sm100' is not implemented yet; implemented: 'sm90', 'emulated'. "
            "Use Config(target='auto') or 'emulated'."
        )
    return config.target
