"""Absolute module paths for graphs Dynamo compiles inside a module.

A graph break inside a module (a Mixtral-style expert loop breaking at ``torch.where``) makes
Dynamo compile the rest of that module's code, and the modules it calls, as frames of their
own: their module paths are relative to the frame (``w1``, not
``layers.3.moe.experts.2.w1``), and ``Config.include_fqns``/``exclude_fqns`` would match the
wrong strings. ``frame_place(gm)`` finds where the frame sits: the model is the outermost
``nn.Module`` being called on the Python stack (the compiled model's), and the frame's place is
where the graph's parameters sit in it, by identity, less their paths in the frame. It sets
``passes._graph.FRAME`` for the passes, which make every path absolute with it.

One compiled frame may serve several modules of one class (Dynamo guards on the code, not on
which expert runs it): ``FramePlace.alike`` lists the paths of those modules, so that rules by
path that would treat them differently can say so.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

import torch.fx as fx
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from mxfp8_compile.passes._graph import FRAME, FramePlace, normalize_fqn

# The frames of a module call (each holds the module as ``self``).
_MODULE_CALLS = frozenset({nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__})


def _calling_model() -> nn.Module | None:
    """The model being run: the module that ``torch.compile`` wrapped (the innermost
    ``OptimizedModule`` being called on the Python stack), else the outermost module being called
    (``model.compile()``, or a compiled function calling modules)."""
    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _MODULE_CALLS:
            module = frame.f_locals.get("self")
            if isinstance(module, OptimizedModule):
                return module._orig_mod
            outermost = module
        frame = frame.f_back
    return outermost


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    return source.name() if callable(source.name) else source.name  # a method before torch 2.13


def find_place(gm: fx.GraphModule, model: nn.Module | None) -> FramePlace:
    """Where the frame of Dynamo graph ``gm`` sits in ``model``."""
    params = [(n, n.meta["grapharg"].example) for n in gm.graph.find_nodes(op="placeholder")
              if isinstance(getattr(n.meta.get("grapharg"), "example", None), nn.Parameter)]
    if model is None or not params:
        return FramePlace("")  # no module's parameters: nothing to place
    names: dict[int, list[str]] = {}  # tied weights have several
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(normalize_fqn(name))
    prefixes: set[str] | None = None
    for node, param in params:
        relative = normalize_fqn(_source_name(node) or "")
        fits = {a[: len(a) - len(relative)].rstrip(".") for a in names.get(id(param), ())
                if a == relative or a.endswith("." + relative)}
        prefixes = fits if prefixes is None else prefixes & fits
    if len(prefixes) != 1:
        return FramePlace(None)
    (path,) = prefixes
    if not path:
        return FramePlace("")
    modules = {normalize_fqn(name): m for name, m in model.named_modules()}
    kind = type(modules[path])
    return FramePlace(path, tuple(name for name, m in modules.items() if type(m) is kind and name != path))


_PLACING = contextvars.ContextVar("mxfp8_placing", default=False)


@contextlib.contextmanager
def frame_place(gm: fx.GraphModule) -> Iterator[FramePlace]:
    """Compile ``gm`` (a Dynamo graph) in this block: the passes see its module paths absolute.
    Nested blocks (Inductor re-entering ``compile_fx`` with the graphs it made) keep the outer
    place."""
    if _PLACING.get():
        yield FRAME.get()
        return
    place = find_place(gm, _calling_model())
    tokens = FRAME.set(place), _PLACING.set(True)
    try:
        yield place
    finally:
        FRAME.reset(tokens[0])
        _PLACING.reset(tokens[1])
