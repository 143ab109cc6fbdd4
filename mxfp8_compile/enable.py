"""``enabled()``: the plugin's passes for compilations by the default Inductor backend."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from mxfp8_compile._hooks import joint_pass_patches
from mxfp8_compile.config import Config
from mxfp8_compile.module_paths import frame_place
from mxfp8_compile.passes import report as _report
from mxfp8_compile.report_store import compile_reporting


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

    Dynamo graphs compiled in the block by a backend other than Inductor (``"aot_eager"``, ...)
    never see the passes: leaving the block then warns.
    """
    from torch._dynamo.utils import counters
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor import config as inductor_config

    config = config or Config()
    _warn_if_dynamo_compiled_already()
    graphs_before, reports_before, inductor_calls = counters["stats"]["unique_graphs"], _report.recorded(), [0]
    original = compile_fx_module.compile_fx

    # Inductor's backends look compile_fx up when they compile; wrapped, it keeps the reports
    # of graphs served from Inductor's caches (report_store) and counts Inductor compilations.
    @functools.wraps(original)
    def compile_fx(gm: Any, example_inputs: Any, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        inductor_calls[0] += 1
        with frame_place(gm):
            return compile_reporting(gm, example_inputs, config,
                                     lambda: original(gm, example_inputs, *args, **kwargs))

    compile_fx_module.compile_fx = compile_fx
    try:
        with inductor_config.patch(joint_pass_patches(config)):
            yield
    finally:
        compile_fx_module.compile_fx = original
    passes_ran = inductor_calls[0] or _report.recorded() > reports_before  # (our own backends record)
    if counters["stats"]["unique_graphs"] > graphs_before and not passes_ran:
        warnings.warn(
            "mxfp8_compile.enabled(): torch.compile compiled graphs in this block without Inductor (another "
            "backend, such as 'aot_eager' or 'eager'), so the plugin's passes did not run on them. Use "
            "torch.compile's default backend inside the block, or backend='mxfp8' / "
            "mxfp8_compile.backend(config, inductor=False) for AOTAutograd without Inductor.",
            stacklevel=3,
        )


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
