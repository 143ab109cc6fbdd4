"""The plugin inside a training stack: activation checkpointing (full and selective), FSDP2 on two
gloo ranks, dynamic token counts, and a changed Config in the same process.

Checkpointing runs compile the example model twice with the same checkpointing, in bf16 and with
the plugin, under AOTAutograd with Inductor's partitioner (the graphs Inductor sees); one runs
through Inductor with ``backend="mxfp8"``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import composability_workers as workers
import mxfp8_compile
from compare import Comparison, compare, count_ops, mse_to
from ep_workers import run_ranks
from mxfp8_compile.backend import aot_backend
from mxfp8_compile.examples.checkpointing import POLICIES, checkpoint_moe, checkpointed
from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes._graph import normalize_fqn
from mxfp8_compile.passes.report import PassReport, Role
from mxfp8_compile.tools.dump import saved_for_backward
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import CheckpointPolicy

aten, mxfp8 = torch.ops.aten, torch.ops.mxfp8
Graphs = dict[str, fx.GraphModule]


# --------------------------------------------------------------------------------------------
# Activation checkpointing.
# --------------------------------------------------------------------------------------------


def test_module_fqns_inside_a_checkpoint_wrapper_are_the_users() -> None:
    # Dynamo's path to a module traced inside torch's checkpoint wrapper; FQN filters
    # (Config.include_fqns, exclude_fqns, keep_bf16_modules) must see what the state_dict names.
    path = "L['self'].layers.0.moe.__dict__['_modules']['_checkpoint_wrapped_module'].experts"
    assert normalize_fqn(path) == "layers.0.moe.experts"


@dataclasses.dataclass
class CheckpointRun:
    """One training step of the one-block example with its MoE layer checkpointed by ``policy``:
    the plugin's run against the bf16 compile with the same checkpointing."""

    policy: str
    result: Comparison
    report: PassReport
    mx: Graphs  # "joint" (after the passes), "forward", "backward"
    bf16: Graphs

    def expert_forward_gemms(self) -> set[str]:
        return {s.label for s in self.report.converted() if s.role is Role.FORWARD and s.fqn == "layers.0.moe.experts"}


@pytest.fixture(scope="module", params=POLICIES)
def checkpoint_run(request: pytest.FixtureRequest) -> CheckpointRun:
    torch._dynamo.reset()
    model, inputs = build(MoEConfig(layers=1))
    checkpoint_moe(model, request.param)
    mx: Graphs = {}
    bf16: Graphs = {}
    result = compare(
        model,
        lambda m: torch.compile(m, backend=mxfp8_compile.backend(inductor=False, on_graph=mx.__setitem__)),
        inputs,
        mse_to("random"),
        reference_fn=lambda m: torch.compile(m, backend=aot_backend(None, bf16.__setitem__)),
    )
    return CheckpointRun(request.param, result, mxfp8_compile.last_report(), mx, bf16)


def _gemm_of(node: fx.Node) -> str:
    """The label of the GEMM whose rewrite inserted ``node`` ("" for other nodes)."""
    return node.meta.get("mxfp8", "").removeprefix("rewrite_gemms:")


def _inserted_by(gm: fx.GraphModule, labels: set[str]) -> list[fx.Node]:
    """Nodes the rewrite inserted for the GEMMs ``labels``."""
    return [n for n in gm.graph.nodes if _gemm_of(n) in labels]


def test_checkpointed_expert_gemms_are_converted_forward_and_backward(checkpoint_run: CheckpointRun) -> None:
    experts = [e for e in checkpoint_run.report.entries if e.site.fqn == "layers.0.moe.experts"]
    assert sorted(e.site.role.value for e in experts) == ["dgrad"] * 3 + ["forward"] * 3 + ["wgrad"] * 3
    assert all(e.converted for e in experts), checkpoint_run.report.to_text()
    for kind in ("forward", "backward"):
        assert count_ops(checkpoint_run.mx[kind], aten._grouped_mm.default) == {str(aten._grouped_mm.default): 0}


def test_inserted_nodes_carry_the_recompute_tags_of_their_gemm(checkpoint_run: CheckpointRun) -> None:
    # The bf16 run's joint graph is the plugin's before the rewrite: same trace, same node names,
    # the same checkpoint regions numbered from a per-process counter (so relabelled).
    bf16 = {n.name: n for n in checkpoint_run.bf16["joint"].graph.nodes}
    joint = checkpoint_run.mx["joint"].graph.nodes
    regions = {bf16[n.name].meta.get("ac_graph_id"): n.meta.get("ac_graph_id") for n in joint if n.name in bf16}
    assert len(set(regions.values())) == len(regions), regions
    inserted = [n for n in joint if "mxfp8" in n.meta]
    assert inserted
    for node in inserted:
        gemm = bf16[_gemm_of(node)]
        assert node.meta.get("recompute") == gemm.meta.get("recompute"), (node.name, gemm.name)
        assert node.meta.get("ac_graph_id") == regions[gemm.meta.get("ac_graph_id")], (node.name, gemm.name)
    expected = CheckpointPolicy.MUST_SAVE if checkpoint_run.policy == "save_grouped_mm" else CheckpointPolicy.PREFER_RECOMPUTE
    tags = {n.meta.get("recompute") for n in _inserted_by(checkpoint_run.mx["joint"], checkpoint_run.expert_forward_gemms())}
    assert tags == {expected}


def test_recomputed_region_requantizes_and_a_saved_region_saves_the_gemm_outputs(checkpoint_run: CheckpointRun) -> None:
    forward_gemms = checkpoint_run.expert_forward_gemms()
    backward = checkpoint_run.mx["backward"]
    quantize_and_gemm = (mxfp8.quantize.default, mxfp8.scaled_grouped_mm.default)
    # what the backward computes for the forward GEMMs (views of saved tensors cost nothing)
    recomputed = [n for n in _inserted_by(backward, forward_gemms) if n.target in quantize_and_gemm]
    saved = {n.name: n.meta["val"] for n in backward.graph.find_nodes(op="placeholder")}
    outputs = [n.name for n in _inserted_by(checkpoint_run.mx["forward"], forward_gemms)
               if n.target is mxfp8.scaled_grouped_mm.default]
    assert len(outputs) == 3
    if checkpoint_run.policy == "save_grouped_mm":
        assert not recomputed, [n.name for n in recomputed]
        assert all(saved[name].dtype == torch.bfloat16 for name in outputs), outputs
    else:  # the backward quantizes the operands of each of them again and reruns the MX GEMM
        for op in quantize_and_gemm:
            assert {_gemm_of(n) for n in recomputed if n.target is op} == forward_gemms, op
        assert not any(name in saved for name in outputs)


def test_checkpointed_numerics_against_bf16_with_the_same_checkpointing(checkpoint_run: CheckpointRun) -> None:
    # test_compile_moe's whole-model bars on the same one-block model
    result = checkpoint_run.result
    print(f"{checkpoint_run.policy}: output {result.output:.1f} dB, input grad {result.input_grad:.1f} dB, "
          f"worst weight {result.worst_weight}")
    assert result.output >= 23
    assert result.input_grad >= 29
    assert result.worst_weight[1] >= 21, result.worst_weight


def test_saved_for_backward_by_dtype(checkpoint_run: CheckpointRun) -> None:
    # Measured (one block, MoE checkpointed): full: bf16 1.38 MiB saved -> 1.32 MiB bf16 + 32 KiB
    # e4m3 + 1 KiB scales (the attention linears' wgrad operands, saved quantized along tokens);
    # save_grouped_mm: 1.57 MiB -> 1.50 MiB bf16 (with the 3 expert GEMM outputs) + the same fp8.
    bf16, mx = (saved_for_backward([graphs["backward"]]) for graphs in (checkpoint_run.bf16, checkpoint_run.mx))
    print(f"{checkpoint_run.policy}: saved for backward, bf16 compile {bf16}, with the plugin {mx}")
    assert mx["float8_e4m3fn"] > 0 and mx["uint8"] > 0
    assert sum(mx.values()) < sum(bf16.values())


@pytest.mark.usefixtures("no_compile_caches")  # a cache hit runs no pass and leaves no report
def test_full_checkpointing_through_inductor() -> None:
    """``backend="mxfp8"`` with Inductor's code generation, the MoE layer under full
    checkpointing: every expert GEMM converted, numerics as without checkpointing."""
    model, (x,) = build(MoEConfig(layers=1))
    result = compare(checkpointed(model.layers[0].moe), lambda m: torch.compile(m, backend="mxfp8"), (x,), mse_to("ones"))
    experts = [e for e in mxfp8_compile.last_report().entries if e.site.fqn == "experts"]
    assert len(experts) == 9 and all(e.converted for e in experts)
    # test_compile_moe's bars for the MoE layer alone, measured against eager bf16 this way
    print(f"Inductor, full checkpointing: {result}")
    assert result.output >= 23
    assert result.input_grad >= 23
    assert result.worst_weight[1] >= 21, result.worst_weight


# --------------------------------------------------------------------------------------------
# FSDP2, two gloo ranks.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_ranks() -> list[dict[str, dict]]:
    ranks = run_ranks(workers.fsdp_case, world=2, timeout=240)
    return pytree.tree_map_only(np.ndarray, torch.from_numpy, ranks)


@pytest.fixture(scope="module")
def single_process() -> list[dict]:
    """The same model and batches in one process without FSDP: bf16 weights, the plugin, each
    block compiled alone; one step per rank's batch, gradients kept apart (in fp32). On one
    thread, as each rank runs: CPU kernels may split their work by the thread count."""
    torch._dynamo.reset()
    model, batches, target = workers.model_and_batches(world=2)
    model = model.to(torch.bfloat16)
    workers.compile_blocks(model, workers.CONFIG, [])
    steps = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x in batches:
            model.zero_grad()
            result = workers.step(lambda x: model(x.to(torch.bfloat16)), x, target)
            result["grads"] = {n: p.grad.float() for n, p in model.named_parameters()}
            steps.append(result)
    finally:
        torch.set_num_threads(threads)
    return steps


def test_fsdp2_converts_every_expert_gemm_and_leaves_the_collectives_alone(fsdp_ranks: list[dict[str, dict]]) -> None:
    for rank in fsdp_ranks:
        mx = rank["mxfp8"]
        # Per compiled block (identical blocks may share one): its 3 expert GEMMs, forward, dgrad
        # and wgrad, all converted; the forward and dgrad GEMMs see all 8 experts' weights,
        # all-gathered before the block, of which this rank holds 4.
        assert mx["experts"]
        for experts in mx["experts"]:
            assert sorted((role, converted) for role, converted, _ in experts) == sorted(
                [(role, True) for role in ("forward", "dgrad", "wgrad") for _ in range(3)])
            assert {b for role, _, b in experts if role != "wgrad"} == {("8", "128", "128")}
        assert mx["local_expert_shape"] == (4, 128, 128)
        # no bf16 grouped GEMM left; FSDP2's all-gathers and reduce-scatters run outside the
        # compiled graphs, untouched
        assert all(not ops for _, ops in mx["graphs"]), mx["graphs"]
        assert {kind for kind, _ in mx["graphs"]} == {"forward", "backward"}
        assert any(ops for _, ops in rank["bf16"]["graphs"])  # the check sees grouped GEMMs


def test_fsdp2_numerics_against_bf16_fsdp2(fsdp_ranks: list[dict[str, dict]]) -> None:
    # Measured: output 51.6 / 51.8 dB (rank 0 / 1), input grad 50.0 / 50.3 dB, worst weight grad
    # 23.2 dB (the second router gate), losses equal to 5 digits.
    for rank in fsdp_ranks:
        bf16, mx = rank["bf16"], rank["mxfp8"]
        output, input_grad = sqnr(bf16["output"], mx["output"]), sqnr(bf16["input_grad"], mx["input_grad"])
        worst = min((sqnr(bf16["grads"][n], g), n) for n, g in mx["grads"].items())
        print(f"FSDP2 vs bf16 FSDP2: loss {bf16['loss']!r} / {mx['loss']!r}, output {output:.1f} dB, "
              f"input grad {input_grad:.1f} dB, worst weight {worst}")
        assert output >= 23 and input_grad >= 29 and worst[0] >= 21, (output, input_grad, worst)
        assert mx["loss"] == pytest.approx(bf16["loss"], rel=1e-3)


def test_fsdp2_matches_one_process_bit_for_bit(fsdp_ranks: list[dict[str, dict]], single_process: list[dict]) -> None:
    # The same compiled block on the same whole weights; FSDP2 averages the ranks' gradients in
    # fp32 (reduce_dtype), as the one-process run does here.
    exact = {"rtol": 0, "atol": 0}
    for sharded, alone in zip((r["mxfp8"] for r in fsdp_ranks), single_process):
        assert sharded["loss"] == alone["loss"]
        torch.testing.assert_close(sharded["output"], alone["output"], **exact)
        torch.testing.assert_close(sharded["input_grad"], alone["input_grad"], **exact)
    for name, grad in fsdp_ranks[0]["mxfp8"]["grads"].items():
        mean = (single_process[0]["grads"][name] + single_process[1]["grads"][name]) / 2
        torch.testing.assert_close(grad, mean, **exact, msg=name)


# --------------------------------------------------------------------------------------------
# Dynamic token counts; a changed Config in the same process.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", ["dynamic=True", "mark_dynamic"])
def test_a_dynamic_token_count_compiles_once_and_converts(dynamic: str) -> None:
    model, _ = build(MoEConfig(layers=1))
    counter = CompileCounterWithBackend(mxfp8_compile.backend(inductor=False))
    compiled = torch.compile(copy.deepcopy(model), backend=counter, dynamic=True if dynamic == "dynamic=True" else None)
    reports = []
    for seq in (64, 40):  # 128 tokens, then 80: not a multiple of 32
        x = torch.randn(2, seq, MoEConfig.dim, dtype=torch.bfloat16)
        if dynamic == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 1)
        out = compiled(x)
        out.float().pow(2).mean().backward()  # the training graph, forward and backward
        reports.append(mxfp8_compile.last_report())
        with torch.no_grad():
            assert sqnr(model(x), out.detach()) >= 23  # test_compile_moe's output bar
    assert counter.frame_count == 1 and reports[0] is reports[1]
    experts = [e for e in reports[0].entries if e.site.fqn == "layers.0.moe.experts"]
    assert len(experts) == 9 and all(e.converted for e in experts)
    assert not experts[0].site.shapes[0][0].isdigit(), reports[0].to_text()  # a symbolic token count


def _dense_block() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
    return block.to(torch.bfloat16), torch.randn(2, 64, 128, dtype=torch.bfloat16)


def _example_moe() -> tuple[torch.nn.Module, torch.Tensor]:
    model, (x,) = build(MoEConfig(layers=1))
    return model, x


@pytest.mark.parametrize("make", [_example_moe, _dense_block], ids=["example_moe", "dense_block"])
def test_dynamic_converts_what_static_does_wgrads_included(make: Callable) -> None:
    model, x = make()
    reference = _step(model, x, None)

    def run(dynamic: bool) -> tuple[set[tuple[str, str]], list[float]]:
        torch._dynamo.reset()
        mark = _report.recorded()
        result = _step(model, x, mxfp8_compile.backend(inductor=False), dynamic=dynamic)
        converted = {(s.role.value, s.fqn) for r in _report.reports_since(mark) for s in r.converted()}
        return converted, [sqnr(reference[k], result[k]) for k in reference]

    static, static_sqnr = run(False)
    dynamic, dynamic_sqnr = run(True)
    assert dynamic == static and {role for role, _ in static} == {"forward", "dgrad", "wgrad"}
    assert all(d >= s - 0.5 for s, d in zip(static_sqnr, dynamic_sqnr)), (static_sqnr, dynamic_sqnr)


def _step(model: torch.nn.Module, x: torch.Tensor, backend: Callable | None, dynamic: bool = False) -> dict:
    """Output, input grad and weight grads of one step of ``model`` (eager for ``backend=None``)."""
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_()
    run = model if backend is None else torch.compile(model, backend=backend, dynamic=dynamic)
    out = run(x)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None and p.dim() > 1}
    return {"output": out.detach().float(), "input grad": x.grad.float(), **grads}


@pytest.fixture
def one_grouped_gemm() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The example's routed experts alone on ragged groups (an empty one too): quick to compile."""
    model, (x,) = build(MoEConfig(layers=1))
    offs = torch.tensor([0, 10, 40, 40, 100, 150, 200, 256], dtype=torch.int32)
    return model.layers[0].moe.experts, torch.randn(256, x.shape[-1], dtype=x.dtype), offs


@pytest.mark.usefixtures("no_compile_caches")  # every compilation runs the pass and reports
def test_a_changed_config_compiles_a_new_artifact(one_grouped_gemm: tuple) -> None:
    experts, x, offs = one_grouped_gemm

    def run(mode: str) -> torch.Tensor:
        with torch.no_grad():
            return torch.compile(experts, backend="mxfp8", options={"scale_mode": mode})(x, offs)

    fresh = {}
    for mode in ("rceil", "floor"):
        torch._dynamo.reset()
        fresh[mode] = run(mode)
    assert not torch.equal(fresh["rceil"], fresh["floor"])

    torch._dynamo.reset()
    mark = _report.recorded()
    for mode in ("rceil", "floor", "rceil"):  # the same module again and again in one process
        torch.testing.assert_close(run(mode), fresh[mode], rtol=0, atol=0, msg=mode)
    # two compilations; the third call is Dynamo's first artifact again (equal backend and options)
    configs = [r.config for r in _report.reports_since(mark)]
    assert len(configs) == 2 and "scale_mode='rceil'" in configs[0] and "scale_mode='floor'" in configs[1]


@pytest.mark.parametrize("before", [None, "rceil"], ids=["compiled_without_the_plugin", "compiled_with_rceil"])
def test_enabled_warns_about_code_dynamo_compiled_already(one_grouped_gemm: tuple, before: str | None) -> None:
    # enabled() acts through Inductor's config, which Dynamo does not guard on, and torch.compile's
    # default backends compare equal: code compiled before the block is reused inside it
    experts, x, offs = one_grouped_gemm
    floor = mxfp8_compile.Config(scale_mode="floor")
    with torch.no_grad():
        with contextlib.nullcontext() if before is None else mxfp8_compile.enabled(mxfp8_compile.Config(scale_mode=before)):
            first = torch.compile(experts)(x, offs)
        with pytest.warns(UserWarning, match="compiled code in this process before this block"):
            with mxfp8_compile.enabled(floor):
                reused = torch.compile(experts)(x, offs)
        assert torch.equal(first, reused)  # what the warning says
        torch._dynamo.reset()  # what it advises
        with mxfp8_compile.enabled(floor):
            second = torch.compile(experts)(x, offs)
    assert not torch.equal(first, second)
