"""FSDP2 runs for tests/test_composability.py: what each gloo rank (spawned by
``ep_workers.run_ranks``, every wait bounded) computes and hands back to the test.

The example model as torchtitan shards an MoE model without expert parallelism: ``fully_shard``
on every block (its routed experts' (E, N, K) weights sharded along E: 4 of 8 experts per rank)
and on the root, fp32 master weights and bf16 compute (``MixedPrecisionPolicy``), every block
compiled on its own with ``fullgraph=True``. FSDP2 runs its all-gathers and reduce-scatters in
hooks that Dynamo does not trace, so each compiled block sees whole bf16 weights as plain tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from mxfp8_compile import Config
from mxfp8_compile.backend import aot_backend
from mxfp8_compile.examples.moe import MoEConfig, MoEModel, build
from mxfp8_compile.passes import report as _report

LAYERS = 2
# The routed experts only, as torchtitan's MXFP8 MoE recipe converts. With every linear converted
# too, the first block's expert weight grads of this two-block model measure 19.7 dB against bf16
# FSDP2, and 17.7 dB in one process without FSDP on rank 0's batch: the depth, not FSDP (the
# layer bar of 21 dB holds for one block: 22.9 dB).
CONFIG = Config(include_fqns=("experts",))


def model_and_batches(world: int) -> tuple[MoEModel, list[torch.Tensor], torch.Tensor]:
    """The fp32 model, one batch of embeddings per rank, and the regression target."""
    model, (x,) = build(MoEConfig(layers=LAYERS), dtype=torch.float32)
    batches = [torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    target = torch.randn(x.shape[:-1] + (model.lm_head.out_features,), generator=torch.Generator().manual_seed(1))
    return model, batches, target


def compile_blocks(model: MoEModel, config: Config | None, graphs: list[tuple[str, list[str]]]) -> None:
    """Each block compiled alone, as torchtitan does; ``graphs`` collects, per compiled forward
    and backward graph, its kind and the collectives and bf16 grouped GEMMs in it."""

    def keep(kind: str, gm: torch.fx.GraphModule) -> None:
        if kind in ("forward", "backward"):
            ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            graphs.append((kind, [op for op in ops if "c10d" in op or op == "aten._grouped_mm.default"]))

    backend = aot_backend(config, keep)  # one backend: identical blocks share its work
    for block in model.layers:
        block.compile(backend=backend, fullgraph=True)


def step(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """One forward and backward; the loss, output and input gradient."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    loss = F.mse_loss(out.float(), target)
    loss.backward()
    return {"loss": loss.item(), "output": out.detach().float(), "input_grad": x.grad}


def fsdp_case(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """On one rank, one step of the FSDP2 model on this rank's batch: ``"bf16"`` compiled without
    the plugin, ``"mxfp8"`` with it. Each holds the step's results, every parameter's whole
    gradient (tensors as fp32 numpy arrays), the collectives and grouped GEMMs of every compiled
    graph, and per report the expert GEMMs: (role, converted, shape of B as the GEMM sees it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, batches, target = model_and_batches(world)
    out: dict[str, dict[str, Any]] = {}
    for name, config in (("bf16", None), ("mxfp8", CONFIG)):
        torch._dynamo.reset()
        sharded = copy.deepcopy(model)
        for block in sharded.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(sharded, mesh=mesh, mp_policy=policy)
        graphs: list[tuple[str, list[str]]] = []
        compile_blocks(sharded, config, graphs)
        mark = _report.recorded()
        result = step(sharded, batches[rank], target)
        result["grads"] = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
        result["local_expert_shape"] = tuple(sharded.layers[0].moe.experts.w1.to_local().shape)
        result["graphs"] = graphs
        result["experts"] = [[(e.site.role.value, e.converted, e.site.shapes[1]) for e in r.entries
                              if e.site.fqn.endswith("moe.experts")] for r in _report.reports_since(mark)]
        out[name] = result
    # as numpy arrays: a tensor would travel as a handle to this process's memory, gone when it ends
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().float().numpy(), out)
