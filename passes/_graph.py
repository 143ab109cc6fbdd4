"""Graph plumbing shared by the passes: node insertion, symbolic-size checks, module FQNs.

Every node a pass inserts is made by ``insert_call`` (or ``insert_traced``, for a plain function
of aten ops), which computes ``meta["val"]`` under the graph's fake mode (Inductor and the
partitioner read it), copies the replaced GEMM's module and autograd metadata (so reports,
partitioning and activation-checkpointing tags follow the GEMM) and stamps ``meta["mxfp8"]`` with
what inserted it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Metadata carried over from the GEMM a node replaces.
_INHERITED_META = (
    "nn_module_stack",
    "fwd_nn_module_stack",
    "seq_nr",
    "partitioner_tag",
    "autograd_backward",
    "recompute",
    "ac_graph_id",
    "stack_trace",
    "original_aten",
)


def _val(arg: Any) -> Any:
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


def _fake_mode(vals: Any) -> Any:
    fake_mode = detect_fake_mode([v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)])
    assert fake_mode is not None, "graph values must be fake tensors (meta['val'] missing)"
    return fake_mode


def _stamp(node: fx.Node, like: fx.Node, provenance: str) -> None:
    for key in _INHERITED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["mxfp8"] = provenance


def insert_call(
    graph: fx.Graph,
    target: Callable[..., Any],
    args: Sequence[Any],
    *,
    like: fx.Node,
    provenance: str,
    kwargs: dict[str, Any] | None = None,
) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``like`` with ``meta["val"]`` computed on fake
    values (nodes nested in lists, as ``cat`` or a collective's split sizes take them, too)."""
    kwargs = kwargs or {}
    vals, kwvals = fx.node.map_aggregate((tuple(args), kwargs), _val)
    with _fake_mode(vals):
        val = target(*vals, **kwvals)
    with graph.inserting_before(like):
        node = graph.call_function(target, tuple(args), kwargs)
    node.meta["val"] = val
    _stamp(node, like, provenance)
    return node


# make_fx wraps a traced function's result in one of these (``alias`` after decomposition)
_OUTPUT_MARKERS = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)


# Traces of insert_traced's functions, by function and the dtype, device and rank of each argument.
_TRACES: dict[tuple[Any, ...], fx.GraphModule] = {}


def insert_traced(
    graph: fx.Graph, fn: Callable[..., torch.Tensor], args: Sequence[fx.Node], *, like: fx.Node, provenance: str
) -> fx.Node:
    """Insert the aten ops of ``fn(*args)`` (a plain function of tensors) before ``like``;
    returns the node of its result. Traced with Inductor's decompositions, as the graph the
    passes see was, so Inductor lowers and fuses the ops like any other of the graph
    (``_to_copy``, say, is ``prims.convert_element_type`` there).

    ``fn`` must not depend on its arguments' sizes (elementwise, like ``e8m0_to_fp32``): it is
    traced once per dtypes, devices and ranks of its arguments, and each insertion replays that
    trace through ``insert_call``, which computes every node's value on these arguments. Tracing
    costs about 20 ms, and a layer's rewrite decodes two scale tensors per GEMM."""
    vals = [_val(a) for a in args]
    key = (fn, *((v.dtype, v.device, v.dim()) for v in vals))
    if key not in _TRACES:
        from torch._inductor.decomposition import select_decomp_table

        with _fake_mode(vals):
            _TRACES[key] = make_fx(fn, decomposition_table=select_decomp_table())(*vals)
    env: dict[fx.Node, Any] = {}
    placeholders = iter(args)
    result = None
    with _fake_mode(vals):  # also for the ops without tensor arguments (scalar_tensor)
        for node in _TRACES[key].graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "output":
                (result,) = pytree.tree_leaves(fx.node.map_arg(node.args[0], env.__getitem__))
            elif node.target in _OUTPUT_MARKERS:
                env[node] = env[node.args[0]]
            else:
                node_args, node_kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = insert_call(graph, node.target, node_args, like=like, provenance=provenance,
                                        kwargs=node_kwargs)
    assert isinstance(result, fx.Node), result
    return result


def insert_multi(
    graph: fx.Graph,
    target: Callable[..., Any],
    args: Sequence[Any],
    *,
    like: fx.Node,
    provenance: str,
) -> list[fx.Node]:
    """``insert_call`` for an op returning a tuple: one ``getitem`` node per output."""
    node = insert_call(graph, target, args, like=like, provenance=provenance)
    outs = []
    for i, val in enumerate(node.meta["val"]):
        with graph.inserting_before(like):
            item = graph.call_function(operator.getitem, (node, i))
        item.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        item.meta["val"] = val
        outs.append(item)
    return outs


def known_multiple(size: int | torch.SymInt, multiple: int) -> bool:
    """Whether ``size % multiple == 0`` holds for every value a symbolic size can take."""
    return bool(statically_known_true(size % multiple == 0))


_INDEX = re.compile(r"\[(?:'([^']*)'|\"([^\"]*)\"|(\d+))\]")
# Not parts of the FQN users see: Dynamo spells some attribute accesses through the module's
# dicts (``moe.__dict__['_modules']['x']``, inside activation checkpointing), and torch's
# checkpoint wrapper adds a component that its state_dict hides.
_HIDDEN_COMPONENTS = frozenset({"__dict__", "_modules", "_parameters", "_buffers", "_checkpoint_wrapped_module"})


@dataclasses.dataclass(frozen=True)
class FramePlace:
    """Where the frame Dynamo compiled into a graph sits in the user's model (module paths in
    the graph are relative to it). ``path``: "" for the model's own forward, the module's path
    for a frame compiled inside a module (after a graph break there), None where unknown.
    ``alike``: the paths of the model's other modules of the same class, which Dynamo may run
    through the same compiled frame."""

    path: str | None
    alike: tuple[str, ...] = ()


# Set around each compilation by ``mxfp8_compile.module_paths.frame_place``.
FRAME: contextvars.ContextVar[FramePlace] = contextvars.ContextVar("mxfp8_frame", default=FramePlace(""))
UNKNOWN_PARENT = "?"  # the first component of a path whose frame's place in the model is unknown


def normalize_fqn(dynamo_path: str) -> str:
    """``L['self'].layers[0].mlp`` or ``L['s'].experts`` -> ``layers.0.mlp`` / ``experts``."""
    path = re.sub(r"^L\[['\"][^'\"]*['\"]\]\.?", "", dynamo_path)
    path = _INDEX.sub(lambda m: "." + next(g for g in m.groups() if g is not None), path)
    path = re.sub(r"^self\.", "", path)
    return ".".join(c for c in path.split(".") if c and c not in _HIDDEN_COMPONENTS)


def module_fqn(node: fx.Node) -> str:
    """FQN in the user's model of the innermost module a node was traced in (for backward nodes,
    the forward's): its path in the graph's frame, under ``FRAME``'s. A path whose frame's
    place is unknown starts with ``UNKNOWN_PARENT``."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    entries = list(stack.values()) if isinstance(stack, dict) else [v for _, v in stack]
    relative = ""
    if entries:
        relative = normalize_fqn(entries[-1][0] if isinstance(entries[-1], tuple) else str(entries[-1]))
    frame = FRAME.get().path
    return ".".join(p for p in (UNKNOWN_PARENT if frame is None else frame, relative) if p)


def is_backward(node: fx.Node) -> bool:
    return node.meta.get("partitioner_tag") == "is_backward" or bool(node.meta.get("autograd_backward"))


VIEW_OPS = {
    torch.ops.aten.permute.default,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.alias.default,
}


def view_source(node: Any) -> Any:
    """Follow view ops back to the tensor they view."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node
