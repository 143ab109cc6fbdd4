"""``python -m mxfp8_compile --selftest`` and ``mxfp8_compile.selftest()``: check, on the GPU at
hand, that the target the plugin picks for it computes what the emulated reference computes.

Run it first on a GPU the plugin has not been seen on (a Blackwell above all: nobody here could
launch its path). On small cases with ragged and empty token groups (sizes 0, 1, 31, 33, 130,
0), in both scale modes:

* casts: every cast op of the target on the GPU against the same op on the CPU (the reference
  math of ``numerics``), byte for byte;
* GEMMs: a grouped GEMM (``torch._grouped_mm``) and a dense one (``mm``), compiled with the
  plugin for the target (AOTAutograd, no Inductor code generation, so it takes seconds), forward
  and backward: the output (forward), the input grad (dgrad) and the weight grad (wgrad) against
  the same compiled for ``emulated`` on the CPU, by SQNR (the accumulation order differs), every
  GEMM converted, and the wgrad of an empty group exactly zero;
* sm100: the grouped GEMM with token groups padded to 32 and ragged (``Config.sm100_ragged_groups``),
  and which of the two this GPU runs right. On an unproven capability (B300) a pass is recorded
  (``targets.write_selftest_record``): from then on ``target="auto"`` picks sm100 there.

One line per case, then a verdict; ``selftest()`` returns whether every case passed, the command
exits 1 if not. On a CPU, ``target="sm90"`` or ``"sm100"`` runs those targets' emulations through
the same harness (the casts are then the reference itself and are not compared).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import mxfp8_compile
from mxfp8_compile import numerics
from mxfp8_compile.config import Config
from mxfp8_compile.lowering import targets

SIZES = (0, 1, 31, 33, 130, 0)  # token groups: empty, one token, a block less one, more one, 4 blocks+
K, N = 128, 96  # contraction and output columns: multiples of 32 and of 16
DENSE_TOKENS = 160
# SQNR bars against the emulated GEMMs: Hopper's fast FP8 accumulation (every role, by default)
# loses about 35 dB worth of bits (tests/test_gpu.py); an MX GEMM differs in summation order only.
BARS = {"sm90": 35.0, "sm100": 40.0}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def _inputs() -> dict[str, Tensor]:
    """CPU tensors; rows whose magnitudes spread over 16 binades (the block scales differ), one zero."""
    g = torch.Generator().manual_seed(0)
    tokens = sum(SIZES)
    x = torch.randn(tokens, K, generator=g) * 2.0 ** torch.randint(-8, 8, (tokens, 1), generator=g)
    x[3] = 0
    return {
        "x": x.to(torch.bfloat16),
        "w": (torch.randn(len(SIZES), N, K, generator=g) / K**0.5).to(torch.bfloat16),
        "dy": torch.randn(tokens, N, generator=g).to(torch.bfloat16),
        "offs": torch.tensor(SIZES).cumsum(0).to(torch.int32),
        "x_dense": torch.randn(DENSE_TOKENS, K, generator=g).to(torch.bfloat16),
        "dy_dense": torch.randn(DENSE_TOKENS, N, generator=g).to(torch.bfloat16),
    }


def _cast_calls(target: str, t: dict[str, Tensor], mode: str) -> dict[str, Callable[[Callable], tuple]]:
    """The cast ops of ``target`` (sm90 or sm100), each as a function of a tensor mover (to the
    GPU, or identity)."""
    ops = torch.ops.mxfp8
    x, w, offs = t["x"], t["w"], t["offs"]
    if target == "sm90":
        return {
            "quantize_rebase x": lambda on: ops.quantize_rebase(on(x), mode),
            "quantize_rebase w": lambda on: ops.quantize_rebase(on(w), mode),
            "quantize_rebase_token_groups x": lambda on: ops.quantize_rebase_token_groups(on(x), on(offs), mode),
        }
    _, s = numerics.to_mx(x, mode=mode)  # scales for the blocked layouts (sm100)
    _, st, po = numerics.to_mx_token_groups(x, offs, mode=mode)
    return {
        "quantize x": lambda on: ops.quantize(on(x), -1, mode),
        "quantize w": lambda on: ops.quantize(on(w), -1, mode),
        "quantize_token_groups x": lambda on: ops.quantize_token_groups(on(x), on(offs), mode),
        "quantize_token_groups_transposed x": lambda on: ops.quantize_token_groups_transposed(on(x), on(offs), mode),
        "quantize_rows_and_token_groups x": lambda on: ops.quantize_rows_and_token_groups(on(x), on(offs), mode),
        "to_blocked": lambda on: (ops.to_blocked(on(s)),),
        "to_blocked_m_groups": lambda on: (ops.to_blocked_m_groups(on(s), on(offs)),),
        "to_blocked_k_groups": lambda on: (ops.to_blocked_k_groups(on(st.t().contiguous()), on(po)),),
    }


def _bytes_equal(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> str | None:
    """None if every output has the reference's shape and bytes, else what differs."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g = g.cpu()
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        g, w = (t.contiguous().view(torch.uint8) if t.element_size() == 1 else t for t in (g, w))
        if not torch.equal(g, w):
            return f"output {i}: {int((g != w).sum())} of {g.numel()} elements differ"
    return None


class _Grouped(nn.Module):
    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        return torch._grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


class _Dense(nn.Module):
    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w.t()


def _train_step(module_type: type[nn.Module], w: Tensor, x: Tensor, extra: tuple[Tensor, ...], dy: Tensor,
                config: Config, device: torch.device) -> tuple[dict[str, Tensor], list[str]]:
    """Forward and backward of a ``module_type(w)`` compiled with ``config`` on ``device``: the
    results per GEMM role, and what the report kept in high precision."""
    torch._dynamo.reset()
    module = module_type(w).to(device)
    x = x.detach().clone().to(device).requires_grad_()  # a leaf of its own: grads accumulate
    compiled = torch.compile(module, backend=mxfp8_compile.backend(config, inductor=False), fullgraph=True)
    out = compiled(x, *(e.to(device) for e in extra))
    out.backward(dy.to(device))
    kept = [f"{s.role.value}: {d}" for s, d in mxfp8_compile.last_report().skipped()]
    return {"forward": out.detach().cpu(), "dgrad": x.grad.cpu(), "wgrad": module.w.grad.cpu()}, kept


def _gemm_cases(name: str, got: dict[str, Tensor], kept: list[str], want: dict[str, Tensor], bar: float,
                empty_groups: list[int]) -> list[Case]:
    if kept:
        return [Case(name, False, "not converted: " + "; ".join(kept))]
    cases = []
    for role, ref in want.items():
        db = numerics.sqnr(ref.float(), got[role].float())
        cases.append(Case(f"{name} {role}", db >= bar, f"SQNR {db:.1f} dB against emulated (bar {bar:.0f})"))
    if empty_groups:
        zero = not got["wgrad"][empty_groups].any()
        cases.append(Case(f"{name} wgrad of empty groups {empty_groups}", zero, "zero" if zero else "NOT zero"))
    return cases


def run_cases(device: torch.device, target: str) -> list[Case]:
    """Every case of ``target`` on ``device``, in both scale modes."""
    import mxfp8_compile.ops  # noqa: F401  (registers the ops)

    t = _inputs()
    cpu = torch.device("cpu")
    cases: list[Case] = []
    empty = [g for g, size in enumerate(SIZES) if size == 0]
    ragged_modes = (False, True) if target == "sm100" else (False,)
    for mode in ("rceil", "floor"):
        if device.type == "cuda":
            for op, call in _cast_calls(target, t, mode).items():
                differs = _bytes_equal(call(lambda v: v.to(device)), call(lambda v: v))
                cases.append(Case(f"{target} {mode} cast {op}", differs is None, differs or "bit-exact"))
        reference = Config(target="emulated", scale_mode=mode)
        grouped = (_Grouped, t["w"], t["x"], (t["offs"],), t["dy"])
        dense = (_Dense, t["w"][0], t["x_dense"], (), t["dy_dense"])
        for kind, step in (("grouped", grouped), ("dense", dense)):
            want, _ = _train_step(*step, reference, cpu)
            for ragged in ragged_modes if kind == "grouped" else (False,):
                # every case converted, whatever the cost model would keep: the kernels are checked
                config = Config(target=target, scale_mode=mode, sm100_ragged_groups=ragged, cost_model=False)
                got, kept = _train_step(*step, config, device)
                padding = ("ragged " if ragged else "padded ") if target == "sm100" else ""
                groups = f" ({padding}groups {list(SIZES)})" if kind == "grouped" else ""
                cases += _gemm_cases(f"{target} {mode} {kind}{groups}", got, kept, want, BARS[target],
                                     empty if kind == "grouped" else [])
    return cases


def _self_target(device: torch.device) -> str:
    """The target a self-check of ``device`` checks: the fast one torch has kernels for."""
    capability = targets.device_capability(device)
    if targets.has_mx_gemm(capability):
        return "sm100"
    return "sm90" if capability == targets.SM90 else "emulated"


def selftest(device: str | torch.device | None = None, target: str | None = None,
             print_fn: Callable[[str], None] = print) -> bool:
    """Check ``target`` (by default the fast target of ``device``, by default the GPU) against
    the emulated reference; print one line per case and a verdict; True if every case passed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    own = _self_target(device)
    target = target or own
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    capability = targets.device_capability(device)
    print_fn(f"mxfp8 self-check: target {target} on {name} (capability {capability}), torch {torch.__version__}")
    if target == "emulated":
        print_fn("nothing to check: this device runs the emulated target, which is the reference itself")
        return True
    if device.type == "cuda" and target != own:
        print_fn(f"cannot check target {target} on {name}: its target is {own}")
        return False
    start = time.perf_counter()
    with targets.self_check():
        cases = run_cases(device, target)
    for case in cases:
        print_fn(case.line())
    failed = [c for c in cases if not c.passed]
    if target == "sm100":
        other = {"padded": "ragged groups", "ragged": "padded groups"}  # the cases a mode does not run
        modes = {mode: all(c.passed for c in cases if other[mode] not in c.name) for mode in other}
        print_fn(f"token groups on this {'GPU' if device.type == 'cuda' else 'device'}: " + ", ".join(
            f"{mode} {'run right' if ok else 'WRONG'}" for mode, ok in modes.items()))
        if capability in targets.SM100_UNPROVEN:
            path = targets.write_selftest_record(capability, modes)
            print_fn(f"recorded for target='auto' on capability {capability}: {path}")
    verdict = "passed" if not failed else f"FAILED ({len(failed)} failed)"
    print_fn(f"self-check {verdict}: {len(cases) - len(failed)} of {len(cases)} cases in "
             f"{time.perf_counter() - start:.1f} s")
    return not failed
