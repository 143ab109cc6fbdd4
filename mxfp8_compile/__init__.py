"""mxfp8-compile: a torch.compile plugin that trains Mixture-of-Experts models in MXFP8.

``numerics`` holds the MX reference math; ``ops`` registers the ``mxfp8::`` custom ops when it
is imported. Importing this package registers nothing.
"""

from mxfp8_compile import numerics
from mxfp8_compile.numerics import ScaleMode

__all__ = ["ScaleMode", "numerics"]
