"""The README's table of HF transformers MoE families: for each experts implementation, how many
of the expert GEMMs the plugin converts, and where the rest went.

Each family is built tiny (``examples.hf_families``). Its first MoE block (router, experts,
shared experts; in some families the decoder layer that holds the experts) is compiled with
``backend(inductor=False)`` on the emulated target, with the experts alone converted, and run
forward and backward on 64 tokens with the arguments the model passed it. The router then sees
the same bf16 input as in eager, so no top-k choice flips and the SQNRs against eager bf16
measure the expert GEMMs (the progress lines print them: output, input grad, each expert
weight's grad).

A cell reads ``converted/present``, then where the rest went. ``present`` counts the expert
GEMMs the graphs hold, plus, for a weight no compiled graph read, its forward, dgrad and wgrad
per expert (``eager``'s loop). ``batched_mm`` holds a forward and a dgrad per weight: its
weight gradients are outer products per token (a contraction of 1), not GEMMs.

    python -m mxfp8_compile.tools.family_table               # print the table
    python -m mxfp8_compile.tools.family_table --write README.md
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import re
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import mxfp8_compile
from mxfp8_compile import module_paths
from mxfp8_compile.examples import hf_families
from mxfp8_compile.numerics import sqnr as db
from mxfp8_compile.passes import report

BEGIN, END = "<!-- family-table:begin -->", "<!-- family-table:end -->"
HEADER = "| family | `grouped_mm` | `batched_mm` | `eager` |\n|---|---|---|---|"
TOKENS = 64


_SHORT = {"GATHERED_WEIGHTS": "weights gathered per token", "TARGET_RULE": "target rule"}


@dataclasses.dataclass
class Cell:
    """One family under one experts implementation."""

    present: int
    converted: int
    kept: collections.Counter  # SkipReason name -> expert GEMMs kept in bf16 for it
    unseen: int  # expert GEMMs in code that no compiled graph ran
    sqnr: dict[str, float]  # against eager bf16: output, input grad, each expert weight's grad

    def text(self) -> str:
        why = [f"{n} {_SHORT.get(reason, reason.lower())}" for reason, n in self.kept.items()]
        if self.unseen:
            why.append(f"{self.unseen} outside every graph (a graph break)")
        return f"{self.converted}/{self.present}" + (f": {', '.join(why)}" if why else "")


def measure(family: str, implementation: str) -> Cell:
    """Compile ``family``'s first MoE block under ``implementation`` and account for its expert GEMMs."""
    call = hf_families.moe_block_call(hf_families.tiny_model(family, implementation), TOKENS)
    experts = hf_families.experts_modules(call.block)
    weights = [(path, name) for path, m in experts for name, p in m.named_parameters(recurse=False) if p.dim() == 3]

    target = torch.randn(call.hidden.shape, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(call.block)
    torch._dynamo.reset()
    mark = report.recorded()
    # the experts only (torchao's scope): the router sees the same bf16 input in both runs, so
    # no top-k choice flips and the SQNRs measure the expert GEMMs
    config = mxfp8_compile.Config(include_fqns=tuple(path for path, _ in experts))
    compiled = torch.compile(call.block, backend=mxfp8_compile.backend(config, inductor=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unread-weights warning: counted below instead
        out, dx = _step(call, compiled, target)
    ref_out, ref_dx = _step(call, reference, target)

    entries = [
        e for r in report.reports_since(mark) for e in r.entries
        if any(e.site.fqn == path or e.site.fqn.startswith(path + ".") for path, _ in experts)
    ]
    unread = module_paths.unread_weights(call.block)
    unseen = sum(3 * hf_families.EXPERTS for path, name in weights if name in unread.get(path, ()))
    kept = collections.Counter(e.decision.reason.name for e in entries if not e.converted)
    converted = sum(e.converted for e in entries)
    sqnr = {}
    if converted:
        sqnr = {"output": db(ref_out, out), "input grad": db(ref_dx, dx)}
        ref_params, params = dict(reference.named_parameters()), dict(call.block.named_parameters())
        for path, name in weights:
            full = f"{path}.{name}" if path else name
            sqnr[full] = db(ref_params[full].grad, params[full].grad)
    return Cell(len(entries) + unseen, converted, kept, unseen, sqnr)


def _step(call: hf_families.BlockCall, module: torch.nn.Module, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and hidden-state grad of one forward and backward of ``module`` called as ``call``."""
    x = call.hidden.clone().requires_grad_()
    out = call.run(module, x)
    F.mse_loss(out.float(), target).backward()
    return out.detach(), x.grad


def row(family: str, cells: dict[str, Cell]) -> str:
    """The table's row for ``family``."""
    return f"| {family} | " + " | ".join(cells[i].text() for i in hf_families.IMPLEMENTATIONS) + " |"


def measure_family(family: str) -> dict[str, Cell]:
    return {impl: measure(family, impl) for impl in hf_families.IMPLEMENTATIONS}


def readme_rows(readme: str) -> dict[str, str]:
    """The family table's rows in ``readme``'s text, by family."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"no family table: the README needs the markers {BEGIN} and {END}")
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| (\w+) \|.*\|$", table, re.MULTILINE) if m.group(1) != "family"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="default: every family with the experts interface")
    parser.add_argument("--write", metavar="README", help="replace the table between the markers in this file")
    args = parser.parse_args(argv)
    families = args.families or list(hf_families.experts_families())
    unknown = sorted(set(families) - set(hf_families.experts_families()))
    if unknown:
        parser.error(f"not families with the experts interface: {', '.join(unknown)}")
    rows, failed = [], []
    for i, family in enumerate(families, 1):
        start = time.perf_counter()
        note = ""
        try:
            cells = measure_family(family)
            rows.append(row(family, cells))
            if cells["grouped_mm"].sqnr:
                note = ", grouped_mm SQNR " + " / ".join(f"{v:.1f}" for v in cells["grouped_mm"].sqnr.values()) + " dB"
        except Exception as e:  # listed with its error, and the others still measured
            failed.append(family)
            rows.append(f"| {family} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | |")
        print(f"[{i}/{len(families)}] {family}: {time.perf_counter() - start:.1f} s{note}", file=sys.stderr, flush=True)
    table = "\n".join([HEADER, *rows])
    if failed:
        print(f"failed: {', '.join(failed)} (tests/test_hf_families.py shows why)", file=sys.stderr)
    if not args.write:
        print(table)
        return 1 if failed else 0
    with open(args.write) as f:
        text = f.read()
    kept = readme_rows(text)
    if args.families:  # only these rows change
        kept.update({f: r for f, r in zip(families, rows)})
        table = "\n".join([HEADER, *(kept.get(f) or f"| {f} | not measured | | |" for f in hf_families.experts_families())])
    head, rest = text.split(BEGIN, 1)
    with open(args.write, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote {len(rows)} rows to {args.write}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
