"""mxfp8-compile: a torch.compile plugin that trains Mixture-of-Experts models in MXFP8.

Three ways in: ``torch.compile(model, backend="mxfp8")`` (no import needed), ``with
mxfp8_compile.enabled(config):`` around the first call of a default ``torch.compile``, and
``mxfp8_compile.backend(config, inductor=...)`` for an explicit backend callable.
``numerics`` holds the MX reference math; the ``mxfp8::`` ops register when a graph is first
rewritten (or on ``import mxfp8_compile.ops``). Importing this package registers nothing.
"""

from mxfp8_compile import numerics
from mxfp8_compile.backend import backend, mxfp8_backend
from mxfp8_compile.config import Config
from mxfp8_compile.enable import enabled
from mxfp8_compile.numerics import ScaleMode
from mxfp8_compile.passes.report import PassReport, last_report, reports

__all__ = [
    "Config",
    "PassReport",
    "ScaleMode",
    "backend",
    "enabled",
    "last_report",
    "mxfp8_backend",
    "numerics",
    "reports",
]
