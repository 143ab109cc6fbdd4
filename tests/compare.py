"""Run a model and its compiled copy on the same inputs and measure SQNRs (DESIGN section 5)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mxfp8_compile.numerics import sqnr


@dataclasses.dataclass
class Comparison:
    output: float
    input_grad: float | None
    weight_grads: dict[str, float]

    @property
    def worst_weight(self) -> tuple[str, float]:
        return min(self.weight_grads.items(), key=lambda kv: kv[1])


def mse_to(target: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchao's loss (``"ones"``: MSE against ones) or MSE against a fixed random target."""

    def loss(out: torch.Tensor) -> torch.Tensor:
        if target == "ones":
            goal = torch.ones(out.shape)
        else:
            goal = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234))
        return F.mse_loss(out.float(), goal)

    return loss


def compare(
    model: torch.nn.Module,
    compile_fn: Callable[[torch.nn.Module], torch.nn.Module],
    inputs: tuple[torch.Tensor, ...],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    reference_fn: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> Comparison:
    """SQNR of the compiled copy against the eager ``model``, or against ``reference_fn(model)``
    (a bf16 compile of it): output, grad of ``inputs[0]`` (if floating point) and every
    parameter's grad."""
    reference = model if reference_fn is None else reference_fn(model)
    compiled_model = copy.deepcopy(model)
    compiled = compile_fn(compiled_model)
    differentiable = inputs[0].is_floating_point()

    def fresh() -> list[object]:
        first = inputs[0].detach().clone().requires_grad_(differentiable)
        return [first, *inputs[1:]]

    ref_inputs, new_inputs = fresh(), fresh()
    ref_out = reference(*ref_inputs)
    new_out = compiled(*new_inputs)
    loss_fn(ref_out).backward()
    loss_fn(new_out).backward()
    grads = {
        name: sqnr(p_ref.grad, p_new.grad)
        for (name, p_ref), (_, p_new) in zip(model.named_parameters(), compiled_model.named_parameters())
        if p_ref.grad is not None
    }
    return Comparison(
        output=sqnr(ref_out.detach(), new_out.detach()),
        input_grad=sqnr(ref_inputs[0].grad, new_inputs[0].grad) if differentiable else None,
        weight_grads=grads,
    )


def count_ops(gm: torch.fx.GraphModule, *targets: object) -> dict[str, int]:
    return {str(t): sum(1 for n in gm.graph.nodes if n.target == t) for t in targets}
