"""Absolute module paths for graphs Dynamo compiles inside a module.

A graph break inside a module (a Mixtral-style expert loop breaking at ``torch.where``) makes
Dynamo compile the rest of that module's code, and the modules it calls, as frames of their
own: their module paths are relative to the frame (``w1``, not
``layers.3.moe.experts.2.w1``), and ``Config.include_fqns``/``exclude_fqns`` would match the
wrong strings. ``frame_place(gm)`` finds where the frame sits: the model is the module that
``torch.compile`` wrapped (else the outermost module being called on the Python stack), and the
frame's place is where the graph's parameters sit in it, by identity, less their paths in the
frame. It sets
``passes._graph.FRAME`` for the passes, which make every path absolute with it.

One compiled frame may serve several modules of one class (Dynamo guards on the code, not on
which expert runs it): ``FramePlace.alike`` lists the paths of those modules, so that rules by
path that would treat them differently can say so.

It also keeps which of a model's parameters its compiled graphs read: a GEMM whose weight no
graph reads runs outside every graph (HF's ``eager`` experts loop over a data-dependent list of
experts, which Dynamo leaves to Python), so the plugin never sees it. ``unread_weights(model)``
names those modules; a model compiled with ``torch.compile(model)`` warns once when it has any,
after its second call (the first compiles, and hooks added during a call run from the next).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
import weakref
from collections.abc import Iterator

import torch.fx as fx
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from mxfp8_compile.passes._graph import FRAME, FramePlace, normalize_fqn

# The frames of a module call (each holds the module as ``self``).
_MODULE_CALLS = frozenset({nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__})


def _calling_model() -> tuple[nn.Module | None, OptimizedModule | None]:
    """The model being run: the module that ``torch.compile`` wrapped (the innermost
    ``OptimizedModule`` being called on the Python stack, returned too), else the outermost
    module being called (``model.compile()``, or a compiled function calling modules)."""
    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _MODULE_CALLS:
            module = frame.f_locals.get("self")
            if isinstance(module, OptimizedModule):
                return module._orig_mod, module
            outermost = module
        frame = frame.f_back
    return outermost, None


# Ids of the parameters each model's compiled graphs have read, and the compiled wrappers that
# check, after their first call, for weights no graph read.
_READ: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()
_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _record_read(model: nn.Module, gm: fx.GraphModule, place: FramePlace, names: dict[int, list[str]]) -> None:
    """Note the parameters ``gm`` reads, and, for a frame compiled inside a module, the same
    parameters of the modules of its class (Dynamo runs them through this graph, compiling
    nothing more). ``names`` is ``_parameter_names(model)``."""
    params = _graph_params(gm)
    read = _READ.setdefault(model, set())
    read.update(id(p) for p in params.values())
    if place.path and place.alike:
        by_name = {name: pid for pid, aliases in names.items() for name in aliases}
        relative = [normalize_fqn(_source_name(node) or "") for node in params]
        read.update(by_name[f"{alike}.{r}"] for alike in place.alike for r in relative if f"{alike}.{r}" in by_name)


def unread_weights(model: nn.Module) -> dict[str, list[str]]:
    """``{module path: [parameter names]}`` of the GEMM weights (parameters of 2 dims or more,
    but an embedding's table) of ``model`` that none of its compiled graphs read, so far."""
    read = _READ.get(model, set())
    unread: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and id(param) not in read:
                unread.setdefault(normalize_fqn(path), []).append(name)
    return unread


def describe_unread(unread: dict[str, list[str]]) -> str:
    """One sentence naming the modules of ``unread_weights`` and the ways out."""
    names = [f"{module or '(model)'} ({', '.join(params)})" for module, params in unread.items()]
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    modules = "1 module" if len(names) == 1 else f"{len(names)} modules"
    return (f"no compiled graph read the weights of {modules}: {listed}. Their GEMMs run outside "
            "the graphs, in bf16, unseen by the plugin: a graph break (an expert loop over torch.where or "
            "nonzero; TORCH_LOGS=graph_breaks shows it) left that code to Python. For HF models, "
            "experts_implementation='grouped_mm' keeps the experts in the graph")


def _warn_once_after_a_call(wrapper: OptimizedModule, model: nn.Module) -> None:
    """Check ``model`` after ``wrapper``'s next call (its hooks run outside Dynamo)."""
    if wrapper in _CHECKED:
        return
    _CHECKED.add(wrapper)

    def check(*_: object) -> None:
        handle.remove()
        if unread := unread_weights(model):
            warnings.warn(f"mxfp8_compile: {describe_unread(unread)}", stacklevel=2)

    handle = wrapper.register_forward_hook(check)


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    return source.name() if callable(source.name) else source.name  # a method before torch 2.13


def _graph_params(gm: fx.GraphModule) -> dict[fx.Node, nn.Parameter]:
    """The parameters a Dynamo graph takes, by placeholder."""
    return {n: n.meta["grapharg"].example for n in gm.graph.find_nodes(op="placeholder")
            if isinstance(getattr(n.meta.get("grapharg"), "example", None), nn.Parameter)}


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): its paths in model}`` (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(normalize_fqn(name))
    return names


def find_place(gm: fx.GraphModule, model: nn.Module | None, names: dict[int, list[str]]) -> FramePlace:
    """Where the frame of Dynamo graph ``gm`` sits in ``model`` (``names``: ``_parameter_names(model)``)."""
    params = list(_graph_params(gm).items())
    if model is None or not params:
        return FramePlace("")  # no module's parameters: nothing to place
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
    model, wrapper = _calling_model()
    names = _parameter_names(model) if model is not None else {}
    place = find_place(gm, model, names)
    if model is not None:
        _record_read(model, gm, place, names)
        if wrapper is not None:
            _warn_once_after_a_call(wrapper, model)
    tokens = FRAME.set(place), _PLACING.set(True)
    try:
        yield place
    finally:
        FRAME.reset(tokens[0])
        _PLACING.reset(tokens[1])
