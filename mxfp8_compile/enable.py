"""``enabled()``: the plugin's passes for compilations by the default Inductor backend."""

from __future__ import annotations

import contextlib
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
    """
    from torch._inductor import config as inductor_config

    with inductor_config.patch(joint_pass_patches(config or Config())):
        yield
