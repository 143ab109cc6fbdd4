"""``mxfp8-dump``: what the plugin did to a model, and why, in words and in a picture.

It compiles the model twice under AOTAutograd with Inductor's decompositions and partitioner
(the graphs Inductor sees, without code generation): once without the plugin (the bf16
baseline, for the saved-for-backward bytes) and once with it. For every graph the plugin saw it
writes, under ``--out``::

    summary.txt                           what the terminal prints
    graph_<i>_<kind>/before.py            the graph as code before the passes
    graph_<i>_<kind>/after.py             ... and after them
    graph_<i>_<kind>/decisions.txt        one line per GEMM: role, shapes, dtype, bytes, module, decision
    graph_<i>_<kind>/report.json          the same, structured
    graph_<i>_<kind>/conversion_map.svg   every GEMM at a glance: a row per module (by layer, in
                                          execution order), a column per role, converted or why not
    graph_<i>_<kind>/regions/<layer>.svg  the rewrite of each GEMM of one layer (``layers.0.svg``,
                                          ``lm_head.svg``): operands, casts, the MXFP8 GEMM

Usage: ``mxfp8-dump --example moe --train``, ``mxfp8-dump path/to/file.py:factory`` where
``factory()`` returns ``(model, example_inputs)``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx as fx

from mxfp8_compile.backend import aot_backend
from mxfp8_compile.config import A2A_PAYLOADS, A2A_WGRAD_POLICIES, A2A_WIRE_FORMATS, KEEP_BF16_ROLES, Config
from mxfp8_compile.module_paths import describe_unread, unread_weights
from mxfp8_compile.passes import report as _report
from mxfp8_compile.passes.hoist_quantize import a2a_payloads
from mxfp8_compile.passes.report import PassReport, SkipReason, format_bytes
from mxfp8_compile.tools._render_detail import region_svgs
from mxfp8_compile.tools._render_map import conversion_map_svg


Size = int | sympy.Expr  # bytes; an expression of the sizes when they are data-dependent
# the flag that lifts a skip reason, where this tool has one
FLAG_HINTS = {SkipReason.NOT_FASTER: " (--no-cost-model converts them)"}


class DumpError(Exception):
    """A problem with what was asked to dump: the message is meant for the user as it is."""


@dataclasses.dataclass
class GraphDump:
    """One graph the plugin saw: its report and the graph after the passes."""

    report: PassReport
    graph: fx.GraphModule | None
    directory: Path | None = None


@dataclasses.dataclass
class DumpResult:
    graphs: list[GraphDump]
    summary: str
    # saved for backward per dtype: bf16 compile, with the plugin (None without --train)
    saved_by_dtype: tuple[dict[str, Size], dict[str, Size]] | None
    out: Path | None

    @property
    def reports(self) -> list[PassReport]:
        return [g.report for g in self.graphs]

    @property
    def saved_bytes(self) -> tuple[Size, Size] | None:
        """Saved for backward in all: bf16 compile, with the plugin."""
        return _totals(self.saved_by_dtype)


# --------------------------------------------------------------------------------------------
# The Python API.
# --------------------------------------------------------------------------------------------


def dump(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    config: Config | None = None,
    *,
    train: bool = True,
    out: str | Path | None = None,
    name: str = "model",
    progress: Callable[[str], None] | None = None,
) -> DumpResult:
    """Compile ``model`` on ``example_inputs`` with the plugin, forward (+ backward if
    ``train``), and return (and, with ``out``, write) what it decided for every GEMM.

    The model is not modified: both compilations run on deep copies. ``example_inputs`` may be
    one tensor. ``out`` is checked before anything compiles: it must be a new or empty
    directory, or an earlier dump's (whose files are replaced). A forced ``sm90`` or ``sm100``
    target on a machine without that GPU plans for it (``targets.planning``): the decisions and
    graphs that GPU would get, with the target's ops run as their CPU emulations.
    """
    from mxfp8_compile.lowering.targets import planning

    config = config or Config()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if out is not None:
        _check_out(Path(out))
    say = progress or (lambda _: None)
    mode = "forward+backward" if train else "forward"
    say(f"compiling {name} ({mode}) without the plugin (bf16 baseline) ...")
    baseline_graphs: list[tuple[str, fx.GraphModule]] = []
    _run(copy.deepcopy(model), example_inputs,
         aot_backend(None, lambda kind, gm: baseline_graphs.append((kind, gm))), train)

    say(f"compiling {name} ({mode}) with backend mxfp8 ...")
    graphs: list[tuple[str, fx.GraphModule]] = []
    mark = _report.recorded()
    compiled_model = copy.deepcopy(model)
    with _report.capture_graphs(), planning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mxfp8_compile: no compiled graph read")  # the summary says it
        _run(compiled_model, example_inputs, aot_backend(config, lambda kind, gm: graphs.append((kind, gm))), train)
    new_reports = _report.reports_since(mark)
    rewritten = [gm for kind, gm in graphs if kind in ("joint", "inference")]
    dumps = [GraphDump(r, gm) for r, gm in zip(new_reports, rewritten)]
    if not any(r.entries for r in new_reports):
        raise DumpError(f"{name}: no GEMM (_grouped_mm, mm, addmm) in the compiled graphs, nothing to convert")

    by_dtype = None
    if train:  # over every backward graph: a graph break makes several
        by_dtype = tuple(saved_for_backward(gm for kind, gm in run if kind == "backward")
                         for run in (baseline_graphs, graphs))
    summary = _summary(name, mode, dumps, by_dtype, baseline_graphs, graphs)
    if unread := unread_weights(compiled_model):
        summary += f"\nweights outside the graphs: {describe_unread(unread)}"
    result = DumpResult(dumps, summary, by_dtype, Path(out) if out is not None else None)
    if out is not None:
        _remove_earlier_dump(Path(out))
        _write(result, Path(out))
    return result


_DUMP_FILES = ("summary.txt", "graph_*_training", "graph_*_inference")


def _check_out(out: Path) -> None:
    """``out`` can take a dump: a new or empty directory, or an earlier dump's, and writable."""
    if out.exists() and not out.is_dir():
        raise DumpError(f"--out {out} is a file; give a directory (new, empty, or an earlier dump's)")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not any(p.match(pattern) for pattern in _DUMP_FILES))
        if foreign and not (out / "summary.txt").is_file():
            raise DumpError(f"--out {out} holds files that are not a dump ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); give a new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DumpError(f"--out {out} cannot be written: {e.strerror or e}") from e


def _remove_earlier_dump(out: Path) -> None:
    """Remove what an earlier dump wrote to ``out`` (so that its graphs do not mix with ours)."""
    for pattern in _DUMP_FILES:
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _run(model: torch.nn.Module, inputs: Sequence[Any], backend: Callable[..., Any], train: bool) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    inputs = list(inputs)
    if train and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point():
        inputs[0] = inputs[0].detach().clone().requires_grad_()
    if not train:
        with torch.no_grad():
            compiled(*inputs)
        return
    out = _first_tensor(compiled(*inputs))
    # squares, not a plain sum: a sum's gradient is an expanded (stride 0) tensor
    out.float().pow(2).mean().backward()


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise DumpError(f"the model's output ({type(out).__name__}) holds no floating-point tensor to train on")


def _nbytes(val: torch.Tensor) -> Size:
    numel = val.numel()
    return (numel.node.expr if isinstance(numel, torch.SymInt) else numel) * val.element_size()


def _format_size(n: Size) -> str:
    """``format_bytes``, or for a symbolic size its constant part plus the rest in bytes:
    ``1.50 KiB + 512*u0 B`` (expert-parallel graphs size tokens by the all-to-all's splits)."""
    n = sympy.sympify(n)
    if n.is_number:
        return format_bytes(int(n))
    constant, rest = n.as_coeff_Add()
    return f"{format_bytes(int(constant))} + {rest} B" if constant else f"{rest} B"


def _totals(by_dtype: tuple[dict[str, Size], dict[str, Size]] | None) -> tuple[Size, Size] | None:
    return None if by_dtype is None else (sum(by_dtype[0].values()), sum(by_dtype[1].values()))


def saved_for_backward(backwards: Iterable[fx.GraphModule]) -> dict[str, Size]:
    """Bytes of what the forward saves for the backward (the backward graphs' non-tangent
    inputs), per dtype name: ``bfloat16``, ``float8_e4m3fn`` (MX data), ``uint8`` (MX scales)..."""
    saved: dict[str, Size] = {}
    for backward in backwards:
        for node in backward.graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if not node.name.startswith("tangents") and isinstance(val, torch.Tensor):
                dtype = str(val.dtype).removeprefix("torch.")
                saved[dtype] = saved.get(dtype, 0) + _nbytes(val)
    return dict(sorted(saved.items()))


def _a2a_line(reports: list[PassReport], baseline: list[tuple[str, fx.GraphModule]],
              graphs: list[tuple[str, fx.GraphModule]]) -> str:
    """Token bytes per row on the wire, summed over the all-to-alls of the joint (or inference)
    graphs, without and with the plugin, and how many the quantization moved ahead of."""
    def token_row_bytes(run: list[tuple[str, fx.GraphModule]]) -> tuple[int, int]:
        payloads = [p for kind, gm in run if kind in ("joint", "inference")
                    for p in a2a_payloads(gm.graph) if p.tokens]
        return sum(p.row_bytes for p in payloads), len(payloads)

    before, count = token_row_bytes(baseline)
    if not count:
        return "all-to-all payload: no all-to-all in the graphs"
    after, _ = token_row_bytes(graphs)
    fed = [h for r in reports for h in r.hoists if not h.site.wire_only]
    carried = sum(h.hoisted for r in reports for h in r.hoists if h.site.wire_only)
    others = (f"{carried} more carried quantized for the wire (a2a_payloads='all')" if carried else
              "the others carry GEMM outputs or gradients to scatter-adds")
    return (f"all-to-all payload: {before} -> {after} B per token row over {count} token all-to-alls "
            f"({after / before:.2f}x); quantization moved ahead of {sum(h.hoisted for h in fed)} of the "
            f"{len(fed)} whose rows feed quantized GEMMs ({others})")


def _summary(
    name: str,
    mode: str,
    dumps: list[GraphDump],
    saved: tuple[dict[str, Size], dict[str, Size]] | None,
    baseline: list[tuple[str, fx.GraphModule]],
    graphs: list[tuple[str, fx.GraphModule]],
) -> str:
    reports = [d.report for d in dumps]
    choices = sorted({(r.target, r.target_why) for r in reports if r.target != "none"})
    target = "; ".join(f"{t} ({why})" for t, why in choices) or "none"
    lines = [f"mxfp8-dump: {name} ({mode}), target {target}"]
    lines.append(f"graphs rewritten: {len(reports)} ({', '.join(r.graph for r in reports)})")
    converted = Counter(f"{e.site.role.value} {e.site.layout.value}" for r in reports for e in r.entries if e.converted)
    kept = Counter(e.decision.reason for r in reports for e in r.entries if not e.converted)
    lines.append(f"GEMMs converted to MXFP8: {sum(converted.values())}")
    lines += [f"  {count:4d}  {key}" for key, count in sorted(converted.items())]
    lines.append(f"GEMMs kept in high precision: {sum(kept.values())}")
    lines += [f"  {count:4d}  {reason.name}: {reason.value}{FLAG_HINTS.get(reason, '')}"
              for reason, count in sorted(kept.items(), key=lambda kv: kv[0].name)]
    before = sum(e.site.bytes_before or 0 for r in reports for e in r.entries if e.converted)
    after = sum(e.site.bytes_after or 0 for r in reports for e in r.entries if e.converted)
    lines.append(f"operands of the converted GEMMs: {format_bytes(before)} -> {format_bytes(after)}")
    lines.append(_a2a_line(reports, baseline, graphs))
    if saved is not None:
        before, after = _totals(saved)
        lines.append(f"saved for backward: {_format_size(before)} (bf16 compile) -> {_format_size(after)} (with the plugin)")
        lines.append("  by dtype: " + ", ".join(
            f"{dtype} {_format_size(saved[0].get(dtype, 0))} -> {_format_size(saved[1].get(dtype, 0))}"
            for dtype in sorted(saved[0].keys() | saved[1].keys())))
    return "\n".join(lines)


def _write(result: DumpResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(result.summary + "\n")
    for i, graph in enumerate(result.graphs):
        directory = out / f"graph_{i}_{graph.report.graph}"
        directory.mkdir(exist_ok=True)
        graph.directory = directory
        (directory / "before.py").write_text(graph.report.graph_before or "")
        (directory / "after.py").write_text(graph.report.graph_after or "")
        (directory / "decisions.txt").write_text(graph.report.to_text() + "\n")
        (directory / "report.json").write_text(_report.json_dumps(graph.report) + "\n")
        (directory / "conversion_map.svg").write_text(conversion_map_svg(graph.report))
        if graph.graph is not None:
            regions = directory / "regions"
            regions.mkdir(exist_ok=True)
            for stem, svg in region_svgs(graph.graph.graph, graph.report).items():
                (regions / f"{stem}.svg").write_text(svg)


# --------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------


def _examples() -> dict[str, Callable[[argparse.Namespace], tuple[torch.nn.Module, tuple[Any, ...]]]]:
    from mxfp8_compile.examples import clients
    from mxfp8_compile.examples.moe import MoEConfig, build

    examples: dict[str, Callable[[argparse.Namespace], Any]] = {
        "moe": lambda args: build(MoEConfig(layers=args.layers)),
    }
    if importlib.util.find_spec("transformers") is not None:
        for family in clients.HF_FAMILIES:
            examples[family] = lambda args, family=family: clients.hf_example(family)
    if importlib.util.find_spec("torchtitan") is not None:
        examples["torchtitan_dsv3"] = lambda args: clients.torchtitan_example()
    return examples


def _load_factory(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    path, sep, attr = spec.rpartition(":")
    if not sep or not path or not attr:
        raise DumpError(f"expected FILE.py:FACTORY, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise DumpError(f"no such file: {file} (from {spec!r}; expected FILE.py:FACTORY)")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    if module_spec is None or module_spec.loader is None:
        raise DumpError(f"{file} is not a Python file (expected FILE.py:FACTORY)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise DumpError(f"importing {file} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DumpError(f"{file} has no function {attr!r}")
    try:
        made = factory()
    except Exception as e:
        raise DumpError(f"{attr}() in {file} raised {type(e).__name__}: {e}") from e
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise DumpError(f"{attr}() in {file} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mxfp8-dump",
        description="Show what the mxfp8 plugin does to a model's GEMMs, and why.",
        epilog="examples: mxfp8-dump --example moe --train;  mxfp8-dump my_model.py:make --train --out dump",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("factory", nargs="?", help="FILE.py:FACTORY; FACTORY() returns (model, example_inputs)")
    what.add_argument("--example", help="a built-in example: moe, or a real client when its package is installed")
    p.add_argument("--train", action="store_true", help="forward and backward (default: forward only)")
    p.add_argument("--out", default="mxfp8-dump", help="where the files go (default: ./mxfp8-dump)")
    p.add_argument("--layers", type=int, default=4, help="blocks of --example moe (default 4)")
    p.add_argument("--scale-mode", default="rceil", choices=["rceil", "floor"])
    p.add_argument("--target", default="auto",
                   help="auto, sm100, sm90 or emulated; sm90 or sm100 without that GPU plans for it (nothing runs on a GPU)")
    p.add_argument("--gemms", default="forward,dgrad,wgrad", help="roles to convert, comma-separated")
    p.add_argument("--no-dense-linears", action="store_true", help="leave dense mm/addmm in bf16")
    p.add_argument("--include", action="append", default=[], help="convert only FQNs containing this (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="keep FQNs containing this in bf16 (repeatable)")
    p.add_argument("--keep-bf16-roles", default=",".join(KEEP_BF16_ROLES),
                   help=f"module roles kept in bf16, read from the graph (default {','.join(KEEP_BF16_ROLES)}; '' for none)")
    p.add_argument("--keep-bf16", default="", help="FQN components kept in bf16 whatever they do, comma-separated")
    p.add_argument("--min-gemm-size", type=int, default=0, help="keep GEMMs with K*N below this in bf16")
    p.add_argument("--no-cost-model", action="store_true",
                   help="convert GEMMs the target's cost model predicts no faster than bf16 too")
    p.add_argument("--a2a-wgrad", default="dequant", choices=A2A_WGRAD_POLICIES,
                   help="wgrads of token rows that cross an all-to-all as MXFP8 (see Config.a2a_wgrad)")
    p.add_argument("--a2a-payloads", default="gemm_inputs", choices=A2A_PAYLOADS,
                   help="which token all-to-alls carry 8 bits (see Config.a2a_payloads)")
    p.add_argument("--a2a-wire-format", default="mxint8", choices=A2A_WIRE_FORMATS,
                   help="the format of the payloads --a2a-payloads all adds (see Config.a2a_wire_format)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _root_cause(e: BaseException) -> BaseException:
    """The exception inside torch's wrappers (``BackendCompilerFailed`` says only "backend
    raised:" on its first line)."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = inner
    return e


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name = f"example {args.example}" if args.example else args.factory
    try:
        config = Config(
            scale_mode=args.scale_mode, target=args.target, gemms=tuple(filter(None, args.gemms.split(","))),
            dense_linears=not args.no_dense_linears, include_fqns=tuple(args.include),
            exclude_fqns=tuple(args.exclude), keep_bf16_modules=tuple(filter(None, args.keep_bf16.split(","))),
            keep_bf16_roles=tuple(filter(None, args.keep_bf16_roles.split(","))),
            min_gemm_size=args.min_gemm_size, cost_model=not args.no_cost_model, a2a_wgrad=args.a2a_wgrad,
            a2a_payloads=args.a2a_payloads, a2a_wire_format=args.a2a_wire_format,
        )
        _check_out(Path(args.out))  # before anything is built or compiled
        if args.example:
            examples = _examples()
            if args.example not in examples:
                raise DumpError(f"unknown example {args.example!r}; available here: {', '.join(examples)}")
            model, inputs = examples[args.example](args)
        else:
            model, inputs = _load_factory(args.factory)
        start = time.perf_counter()
        result = dump(model, inputs, config, train=args.train, out=args.out, name=name,
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (DumpError, ValueError, TypeError, NotImplementedError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"mxfp8-dump: error: {e}" + ("" if args.debug else "  (--debug shows the traceback)"), file=sys.stderr)
        return 1
    except Exception as e:  # a failure inside torch.compile or the model: keep it short unless asked
        if args.debug:
            traceback.print_exc()
        root = _root_cause(e)
        first = str(root).strip().splitlines()[0] if str(root).strip() else ""
        print(f"mxfp8-dump: error: compiling {name} failed: {type(root).__name__}: {first}"
              + ("" if args.debug else "  (--debug shows the traceback)"), file=sys.stderr)
        return 1
    print(result.summary)
    files = sum(1 for p in Path(args.out).rglob("*") if p.is_file())
    print(f"\nwrote {files} files to {args.out}/ in {time.perf_counter() - start:.1f} s "
          f"(decisions.txt: the table; conversion_map.svg: the picture; regions/<layer>.svg: each rewrite; "
          f"before.py/after.py: the graphs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
