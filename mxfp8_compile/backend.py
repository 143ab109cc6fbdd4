"""The ``mxfp8`` torch.compile backend.

``torch.compile(model, backend="mxfp8")`` finds ``mxfp8_backend`` through the
``torch_dynamo_backends`` entry point, with no import; it must not also be decorated with
``register_backend`` (torch would assert on the duplicate name).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from mxfp8_compile._hooks import joint_pass_patches
from mxfp8_compile.config import Config
from mxfp8_compile.module_paths import frame_place
from mxfp8_compile.passes import run_joint_passes
from mxfp8_compile.report_store import compile_reporting

CompiledFn = Callable[..., Any]
GraphSink = Callable[[str, fx.GraphModule], None]


def mxfp8_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> CompiledFn:
    """Backend entry point: ``options`` are ``Config`` fields, ``mode`` is Inductor's mode."""
    return _compile_with_inductor(gm, example_inputs, Config.from_options(options), mode)


def backend(
    config: Config | None = None,
    *,
    mode: str | None = None,
    inductor: bool = True,
    on_graph: GraphSink | None = None,
) -> Callable[[fx.GraphModule, list[torch.Tensor]], CompiledFn]:
    """A backend callable for ``torch.compile(model, backend=backend(config))``.

    ``mode`` is Inductor's (``"max-autotune-no-cudagraphs"``, ...): ``torch.compile`` takes a
    ``mode`` or ``options``, not both, so a Config and a mode together come this way.
    ``inductor=False`` runs the same passes under AOTAutograd without Inductor code generation
    (fast tests, debugging); ``on_graph(kind, gm)`` then sees the rewritten joint graph
    (``"joint"``) and each final graph (``"forward"``, ``"backward"`` or ``"inference"``).
    """
    import mxfp8_compile.ops  # noqa: F401  (registered before any graph can call them)

    if config is not None and not isinstance(config, Config):
        raise TypeError(
            f"mxfp8_compile.backend() takes a Config or None, got {config!r}: pass "
            "mxfp8_compile.Config(scale_mode='floor', ...), or Config.from_options({...}) for a dict of options"
        )
    config = config or Config()
    if inductor:
        if on_graph is not None:
            raise ValueError("on_graph is only available with inductor=False")
        return lambda gm, example_inputs: _compile_with_inductor(gm, example_inputs, config, mode)
    if mode is not None:
        raise ValueError(f"mode={mode!r} is Inductor's: it needs inductor=True")
    return aot_backend(config, on_graph)


def _compile_with_inductor(
    gm: fx.GraphModule, example_inputs: list[torch.Tensor], config: Config, mode: str | None
) -> CompiledFn:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(joint_pass_patches(config))
    with frame_place(gm):
        return compile_reporting(gm, example_inputs, config,
                                 lambda: compile_fx(gm, example_inputs, config_patches=patches))


def aot_backend(config: Config | None, on_graph: GraphSink | None) -> Callable[..., CompiledFn]:
    """AOTAutograd with Inductor's decompositions and partitioner, no code generation; the
    plugin's passes run with ``config``, or not at all for ``None`` (a bf16 baseline)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    def compiler(kind: str) -> Callable[[fx.GraphModule, list[torch.Tensor]], CompiledFn]:
        def compile_graph(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> CompiledFn:
            if kind == "inference" and config is not None:
                run_joint_passes(gm.graph, config)
                gm.recompile()
            if on_graph is not None:
                on_graph(kind, gm)
            return make_boxed_func(gm.forward)

        return compile_graph

    def partition(joint: fx.GraphModule, joint_inputs: list[Any], **kwargs: Any) -> Any:
        if config is not None:
            run_joint_passes(joint.graph, config)
            joint.recompile()
        if on_graph is not None:
            on_graph("joint", joint)
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    # Inductor's decompositions, so the passes see the graphs they see under Inductor.
    aot = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        partition_fn=partition,
        decompositions=select_decomp_table(),
    )

    def compile_frame(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> CompiledFn:
        with frame_place(gm):
            return aot(gm, example_inputs)

    return compile_frame
