"""Targets and Inductor lowerings of the ``mxfp8::`` ops (installed as
``mxfp8_compile.lowering``)."""
