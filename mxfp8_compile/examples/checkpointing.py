"""Activation checkpointing around modules, full or selective, as training stacks apply it.

``checkpointed(module, policy)`` wraps a module in torch's non-reentrant checkpoint wrapper (what
torchtitan applies per block); ``checkpoint_moe(model, policy)`` does it to every MoE layer of
the example model. Under ``torch.compile`` the wrapped region is traced into the joint graph with
a ``recompute`` tag on every node (``CheckpointPolicy``), which the partitioner obeys. A
selective policy names aten ops (it runs while Dynamo traces, before the plugin's rewrite); the
rewrite copies a GEMM's tag to the nodes that replace it, so its quantization is saved or
recomputed with it.

Policies:

* ``"full"``: everything in the region is recomputed in the backward;
* ``"save_grouped_mm"``: selective (``create_selective_checkpoint_contexts``), the outputs of
  ``aten._grouped_mm`` (the routed experts' GEMMs) are saved, everything else is recomputed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mxfp8_compile.examples.moe import MoEModel

_SAVED_OPS: dict[str, frozenset[Any]] = {"save_grouped_mm": frozenset({torch.ops.aten._grouped_mm.default})}
POLICIES = ("full", *_SAVED_OPS)


def _selective(saved: Collection[Any]) -> Callable[[], Any]:
    """The ``context_fn`` of a selective checkpoint that saves the outputs of ``saved`` ops."""

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def checkpointed(module: nn.Module, policy: str = "full") -> nn.Module:
    """``module`` under non-reentrant activation checkpointing with ``policy`` (see ``POLICIES``).
    The wrapper forwards attribute lookups to ``module``. Its ``_checkpoint_wrapped_module``
    component is in module paths but not in state_dict keys, nor in the plugin's FQNs."""
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; allowed: {', '.join(POLICIES)}")
    if policy == "full":
        return checkpoint_wrapper(module)
    return checkpoint_wrapper(module, context_fn=_selective(_SAVED_OPS[policy]))


def checkpoint_moe(model: MoEModel, policy: str = "full") -> MoEModel:
    """Wrap the MoE layer of every block of the example model in place; returns ``model``."""
    for block in model.layers:
        block.moe = checkpointed(block.moe, policy)
    return model
