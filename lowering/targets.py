"""Which implementation of the MX ops a compilation targets (DESIGN section 6).

Decided at compile time from the device of the graph's GEMM operands, never at import.

=========  ==========================================================================
emulated   anywhere: dequantize exactly to bf16, then the bf16 GEMM (the reference)
sm90       H100/H200: rowwise rebase, then FP8 rowwise ``_scaled_grouped_mm``
sm100      B200+: ``_scaled_grouped_mm`` with e8m0 blocked scales
=========  ==========================================================================
"""

from __future__ import annotations

import torch

from mxfp8_compile.config import Config

IMPLEMENTED = ("emulated",)


def select_target(config: Config, device: torch.device | None) -> str:
    """The target for a graph whose GEMM operands live on ``device`` (None: no GEMMs).

    ``auto`` picks the fastest implemented target for the device; a forced target that is not
    implemented raises ``NotImplementedError`` naming what is.
    """
    if config.target == "auto":
        return "emulated"
    if config.target not in IMPLEMENTED:
        raise NotImplementedError(
            f"target {config.target!r} is not implemented yet; implemented: {IMPLEMENTED}. "
            f"Use Config(target='auto') or 'emulated'."
        )
    return config.target
