"""Keep the operand layouts of the grouped GEMMs a rewritten graph leaves in bf16.

Inductor lowers ``aten._grouped_mm`` with whatever layout its operands realise in. In torch's
own graph the wgrad's ``dy^T`` is a view of ``dy``, which the dgrad also reads, so ``dy`` is
realised once and the wgrad gets it strided along tokens. When the rewrite moves the dgrad's read
of ``dy`` into a cast kernel (its prologue), the wgrad is ``dy``'s only other reader, and Inductor
may materialise ``dy^T`` contiguous instead: contiguous along the tokens it contracts. CUDA's
grouped GEMM then needs every group's token count to be a multiple of 16 bytes, and asserts on
the device for any other routing (``prepare_grouped_gemm_data``).

So each operand of a grouped GEMM kept in bf16 is pinned to the strides it was traced with
(``prims.inductor_force_stride_order``: a no-op where the operand already has them, a copy into
them otherwise), as in the graph without the plugin. A graph the plugin did not change is left
alone.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

GROUPED_MM = torch.ops.aten._grouped_mm.default
FORCE_STRIDE_ORDER = torch.ops.prims.inductor_force_stride_order.default


def pin_kept_grouped_layouts(graph: fx.Graph) -> None:
    """Pin the tensor operands of every ``aten._grouped_mm`` in ``graph`` to their traced strides.
    Run only on a graph the rewrite changed."""
    for node in list(graph.find_nodes(op="call_function", target=GROUPED_MM)):
        for operand in node.args[:2]:
            if not isinstance(operand, fx.Node) or operand.target is FORCE_STRIDE_ORDER:
                continue
            val = operand.meta["val"]
            with graph.inserting_before(node):
                pin = graph.call_function(FORCE_STRIDE_ORDER, (operand, list(val.stride())))
            pin.meta.update(operand.meta)
            node.replace_input_with(operand, pin)
