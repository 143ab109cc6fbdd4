"""FX graph passes on aten graphs: find, rewrite and hoist MXFP8 GEMMs (installed as
``mxfp8_compile.passes``)."""
