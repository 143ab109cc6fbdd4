"""Expert-parallel runs for the tests: gloo process groups on loopback, in spawned processes
(or in this one for a group of one), with a bound on every wait so that a hang fails.

``run_ranks(fn, world)`` runs ``fn(rank, world)`` on every rank and returns what each returned
(picklable values only); ``process_group`` opens a group in this process. The case functions
below compile one model several ways (the bf16 expert-parallel baseline, then with the plugin
under each ``a2a_wgrad`` policy) and return numbers and graph facts for the tests to assert on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mxfp8_compile import Config
from mxfp8_compile.backend import aot_backend
from mxfp8_compile.numerics import sqnr
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes.hoist_quantize import a2a_payloads

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo group over 127.0.0.1 for this process, destroyed on exit."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _entry(fn: Callable[[int, int], Any], rank: int, world: int, port: int, results: Any) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    try:
        with process_group(rank, world, port):
            results.put((rank, "ok", fn(rank, world)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[[int, int], Any], world: int = 2, timeout: float = 300) -> list[Any]:
    """``fn(rank, world)`` on ``world`` spawned ranks; their results by rank. A rank that raises,
    or any rank not done within ``timeout`` seconds, fails the call (and the others are killed)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, results)) for rank in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            try:
                rank, status, value = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} not done in {timeout} s") from None
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


# --------------------------------------------------------------------------------------------
# What the tests compare: the bf16 expert-parallel run against the plugin's, per policy.
# --------------------------------------------------------------------------------------------

# One training step: (output, grad of the input or None, loss).
Step = Callable[[torch.nn.Module], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
A2A = tuple[str, str, int]  # dtype, rows, bytes per row


def _run(model: torch.nn.Module, config: Config | None, compile_: Callable[..., None], step: Step) -> dict[str, Any]:
    """Compile a copy of ``model`` (``config`` None: no plugin), run one step, collect results."""
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    graphs: list[tuple[str, list[A2A]]] = []

    def keep(kind: str, gm: torch.fx.GraphModule) -> None:
        if kind in ("forward", "backward", "inference"):
            graphs.append((kind, [(str(p.dtype).removeprefix("torch."), p.rows, p.row_bytes) for p in a2a_payloads(gm.graph)]))

    compile_(model, aot_backend(config, keep))
    mark = _report.recorded()
    output, input_grad, loss = step(model)
    return {
        "output": output.detach(),
        "input_grad": input_grad,
        "loss": loss.item(),
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "graphs": graphs,
        "hoists": [(h.site, h.hoisted, str(h.decision)) for r in _report.reports_since(mark) for h in r.hoists],
    }


def compare_runs(model: torch.nn.Module, configs: dict[str, Config], compile_: Callable[..., None],
                 step: Step) -> dict[str, dict[str, Any]]:
    """Per named config (and ``"bf16"``, the run without the plugin): SQNRs against the bf16 run,
    the loss, every compiled graph's all-to-alls, and the reports' hoist records."""
    reference = _run(model, None, compile_, step)
    out = {"bf16": {"loss": reference["loss"], "graphs": reference["graphs"], "hoists": reference["hoists"]}}
    for name, config in configs.items():
        run = _run(model, config, compile_, step)
        out[name] = {
            "output": sqnr(reference["output"], run["output"]),
            "input_grad": None if run["input_grad"] is None else sqnr(reference["input_grad"], run["input_grad"]),
            "weights": {n: sqnr(reference["grads"][n], g) for n, g in run["grads"].items()},
            **{key: run[key] for key in ("loss", "graphs", "hoists")},
        }
    return out


def _compile_whole(model: torch.nn.Module, backend: Any) -> None:
    model.compile(backend=backend, fullgraph=True)


def policies(base: Config, names: tuple[str, ...]) -> dict[str, Config]:
    """``base`` under each ``a2a_wgrad`` policy in ``names``, keyed by the policy."""
    return {name: dataclasses.replace(base, a2a_wgrad=name) for name in names}


def ep_block_case(rank: int, world: int, expert: str, configs: dict[str, Config]) -> dict[str, dict[str, Any]]:
    """Our expert-parallel block: different tokens on every rank (uneven splits)."""
    from mxfp8_compile.examples.ep_moe import EPMoEConfig, build

    model, (x,) = build(EPMoEConfig(expert=expert))
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + rank))

    def step(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xi = x.detach().clone().requires_grad_()
        out = m(xi)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        return out, xi.grad, loss

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        return compare_runs(model, configs, _compile_whole, step)


def torchtitan_case(rank: int, world: int, configs: dict[str, Config]) -> dict[str, dict[str, Any]]:
    """torchtitan's DeepSeek-V3 debugmodel, expert parallel over all ranks, forced load balance
    (routing no numerics can flip), the same tokens on every rank (so the losses must agree),
    every block compiled on its own with fullgraph=True, as torchtitan's ``apply_compile``; each
    of ``configs`` should convert the routed experts, the expert-parallel pipeline."""
    from torch.distributed.device_mesh import init_device_mesh

    from mxfp8_compile.examples.clients import torchtitan_dsv3_ep

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = torchtitan_dsv3_ep(mesh, force_balance=True)
    tokens = torch.randint(0, 2000, (1, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(1, 32)

    def compile_blocks(m: torch.nn.Module, backend: Any) -> None:
        for block in m.layers.values():  # one backend object: identical blocks share a graph
            block.compile(backend=backend, fullgraph=True)

    def step(m: torch.nn.Module) -> tuple[torch.Tensor, None, torch.Tensor]:
        out = m(tokens, positions, None)
        loss = F.cross_entropy(out.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        return out, None, loss  # token ids: no input grad

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        return compare_runs(model, configs, compile_blocks, step)
