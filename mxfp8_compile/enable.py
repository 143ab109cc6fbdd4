"""``enabled()``: the plugin's passes for compilations by the default Inductor backend."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from mxfp8_compile._hooks import joint_pass_patches
from mxfp8_compile.config import Config


@contextlib.contextmanager
def enabled(config: Config | None = None) -> Iterator[None]:
    """Run the plugin's passes in every Inductor compilation that happens inside the block.

    Compilation happens at a compiled function's first call (and at recompiles), not at
    ``torch.compile(...)``: put the first call inside the block. Calls after the block reuse
    what was compiled inside it; new compilations after it are untouched. Exception-safe and
    nestable: the innermost config wins, and leaving a block restores the hook as it was.

    Code Dynamo compiled already (in another block, or without the plugin) is reused here, even
    through a new ``torch.compile``: Inductor's settings are not in Dynamo's guards. Entering the
    block then warns, so that such code does not stay in bf16 (or another Config) silently. For
    another Config on the same code, pass ``backend=mxfp8_compile.backend(config)`` (or
    ``"mxfp8"`` with ``options``), or call ``torch._dynamo.reset()`` first.
    """
    from torch._inductor import config as inductor_config

    _warn_if_dynamo_compiled_already()
    with inductor_config.patch(joint_pass_patches(config or Config())):
        yield


def _warn_if_dynamo_compiled_already() -> None:
    from torch._dynamo import convert_frame

    compiled = getattr(convert_frame.input_codes, "seen_ids", None)
    if compiled:
        warnings.warn(
            "mxfp8_compile.enabled(): torch.compile has compiled code in this process before this "
            "block; Dynamo reuses that code here without the plugin's passes (or with another "
            "Config). Call torch._dynamo.reset() before the block, or compile with "
            "backend='mxfp8' / mxfp8_compile.backend(config).",
            stacklevel=3,
        )
