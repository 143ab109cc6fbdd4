"""Targets and the GPU kernels behind the ``mxfp8::`` ops (installed as
``mxfp8_compile.lowering``); Inductor lowerings of the casts are still to come."""
