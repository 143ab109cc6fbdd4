"""Which modules are routers and output heads, judged by what their forward GEMM's output feeds.

The default keep-in-bf16 policy (``Config.keep_bf16_roles``) keeps the GEMMs of these modules in
high precision, as torchtitan's and torchao's MXFP8 recipes keep the router gate and the lm_head:
a router's scores pick experts (a small error flips a top-k choice), and the head's logits
feed the loss directly. Names alone mislead (a SwiGLU projection called ``gate``, BERT's
``attention.output.dense``), so the role is read from the graph:

* router: the output reaches a routing op (``topk``, ``sort``, ``argmax``, ``max.dim``) before
  any other GEMM; or the module is named like a router (a ``gate`` / ``router`` component) and its
  output leaves the graph before any GEMM, so the routing happens where the graph cannot show it
  (after a graph break, or forced as torchtitan's debug load balancing does).
* output head: the module is named like one (an ``lm_head`` / ``output`` component) and its
  output reaches the graph's outputs with no GEMM and no residual add after it.

Only forward nodes are followed. The backward GEMMs of a module share its FQN and its role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.fx as fx

from mxfp8_compile.passes._graph import is_backward, module_fqn

aten = torch.ops.aten

ROUTING_OPS = frozenset({aten.topk.default, aten.sort.default, aten.sort.stable, aten.argmax.default, aten.max.dim})
ROUTER_NAMES = ("router", "gate")
HEAD_NAMES = ("lm_head", "output")
_ADDS = frozenset({aten.add.Tensor, aten.sub.Tensor})


@dataclasses.dataclass(frozen=True)
class Reach:
    """What a forward GEMM's output flows into, up to (not through) the next GEMMs."""

    routing_op: str | None  # the first routing op reached, e.g. "aten.topk.default"
    leaves_graph: bool  # reaches the graph's outputs
    residual: bool  # meets an add/sub whose other operand does not come from this output


def reach(gemm: fx.Node, gemms: set[fx.Node]) -> Reach:
    """Follow ``gemm``'s forward users breadth-first, stopping at the nodes in ``gemms``."""
    seen = {gemm}
    frontier = [gemm]
    routing, leaves, adds = None, False, []
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen or user in gemms or is_backward(user):
                continue
            seen.add(user)
            if user.op == "output":
                leaves = True
                continue
            if user.target in ROUTING_OPS and routing is None:
                routing = str(user.target)
            if user.target in _ADDS:
                adds.append(user)
            frontier.append(user)
    residual = any(
        isinstance(arg, fx.Node) and arg not in seen and _is_float_tensor(arg)
        for add in adds for arg in add.args
    )
    return Reach(routing, leaves, residual)


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() > 0


def _named(fqn: str, names: Iterable[str]) -> str | None:
    components = fqn.split(".")
    return next((n for n in names if n in components), None)


def module_roles(forward_gemms: list[fx.Node], gemms: set[fx.Node], roles: tuple[str, ...]) -> dict[str, str]:
    """``{fqn: why}`` for the modules among ``forward_gemms`` that play one of ``roles``
    (``"router"``, ``"lm_head"``); ``why`` is the evidence, in words. A GEMM traced outside any
    module is keyed by its node name instead (its backward GEMMs cannot be told apart)."""
    found: dict[str, str] = {}
    for gemm in forward_gemms:
        fqn = module_fqn(gemm)
        r = reach(gemm, gemms)
        where = fqn or gemm.name
        if "router" in roles:
            if r.routing_op:
                found[where] = f"router: its output picks experts through {r.routing_op}"
                continue
            if (name := _named(fqn, ROUTER_NAMES)) and r.leaves_graph:
                found[where] = (f"router: named {name!r}, and its output leaves the graph with no GEMM after it "
                                "(the routing happens outside the graph)")
                continue
        if "lm_head" in roles and (name := _named(fqn, HEAD_NAMES)) and r.leaves_graph and not r.residual:
            found[where] = f"output head: named {name!r}, and only the graph's outputs (the loss) follow it"
    return found
