"""mxfp8-compile: a torch.compile plugin that trains Mixture-of-Experts models in MXFP8.

Three ways in: ``torch.compile(model, backend="mxfp8")`` (no import needed), ``with
mxfp8_compile.enabled(config):`` around the first call of a default ``torch.compile``, and
``mxfp8_compile.backend(config, inductor=...)`` for an explicit backend callable.
``numerics`` holds the MX reference math; the ``mxfp8::`` ops register when a backend or
``enabled()`` is set up (or on ``import mxfp8_compile.ops``). Importing this package registers
nothing.
"""

import logging as _logging
import os as _os

from mxfp8_compile import numerics

# The plugin's own logging: MXFP8_COMPILE_LOG=INFO (decision tables) or DEBUG. A TORCH_LOGS name
# would not do: torch parses TORCH_LOGS at import and rejects names it does not know.
if _level := _os.environ.get("MXFP8_COMPILE_LOG"):
    _logger = _logging.getLogger("mxfp8_compile")
    _logger.addHandler(_logging.StreamHandler())
    try:
        _logger.setLevel(_level.upper())
    except ValueError:
        _logger.setLevel(_logging.INFO)
        _logger.warning("MXFP8_COMPILE_LOG=%r is not a logging level (DEBUG, INFO, ...); using INFO", _level)
from mxfp8_compile.backend import backend, mxfp8_backend
from mxfp8_compile.config import Config
from mxfp8_compile.enable import enabled
from mxfp8_compile.numerics import ScaleMode
from mxfp8_compile.passes.report import PassReport, last_report, reports



def __getattr__(name: str) -> object:
    # The dump tool pulls in networkx and the SVG renderer, the self-check the ops: load them on
    # first use.
    if name == "dump":
        from mxfp8_compile.tools.dump import dump

        return dump
    if name == "selftest":
        from mxfp8_compile.self_check import selftest

        return selftest
    raise AttributeError(f"module 'mxfp8_compile' has no attribute {name!r}")


__all__ = [
    "Config",
    "PassReport",
    "ScaleMode",
    "backend",
    "dump",
    "enabled",
    "last_report",
    "mxfp8_backend",
    "numerics",
    "reports",
    "selftest",
]
