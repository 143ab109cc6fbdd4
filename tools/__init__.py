"""User-facing tools, such as the graph-dump debugger (installed as ``mxfp8_compile.tools``)."""
