"""Every MoE family of transformers 5.23 with the experts interface, built tiny, under each
experts implementation that runs on a CPU: which expert GEMMs convert, the reasons for the rest,
SQNR bars where they convert, and the README's table (``tools/family_table.py``) as measured."""

from __future__ import annotations

import pathlib

import pytest

from mxfp8_compile.examples import hf_families
from mxfp8_compile.tools import family_table

README = pathlib.Path(__file__).parents[1] / "README.md"
FAMILIES = hf_families.experts_families()


def test_readme_lists_every_family_once() -> None:
    assert len(FAMILIES) >= 60  # transformers 5.23 has 64; far fewer means the discovery broke
    assert list(family_table.readme_rows(README.read_text())) == list(FAMILIES), (
        "the README's family table is not the families of this transformers: "
        "python -m mxfp8_compile.tools.family_table --write README.md"
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family: str) -> None:
    cells = family_table.measure_family(family)
    grouped, batched, eager = (cells[i] for i in ("grouped_mm", "batched_mm", "eager"))
    # grouped_mm, the training path: every expert GEMM of both weights (forward, dgrad, wgrad)
    assert grouped.present == 6 and grouped.converted == 6, grouped
    # experts alone converted: the router sees the same bf16 input in both runs, so no top-k
    # choice flips. Measured over the 64 families (output / input grad / expert weight grads):
    # 23.2-29.7 / 22.5-28.5 / 22.7-25.4 dB; the lowest input grad is MuseSpark's, whose expert
    # outputs pass through an RMSNorm.
    weights = [db for name, db in grouped.sqnr.items() if name not in ("output", "input grad")]
    assert len(weights) == 2 and min(weights) >= 22, grouped.sqnr
    assert grouped.sqnr["output"] >= 23 and grouped.sqnr["input grad"] >= 22, grouped.sqnr
    # batched_mm: forward and dgrad read weights gathered per token, kept with the way out; the
    # weight gradients are per-token outer products, not GEMMs
    assert (batched.present, batched.converted, dict(batched.kept)) == (4, 0, {"GATHERED_WEIGHTS": 4}), batched
    # eager: the loop breaks the graph at nonzero; no compiled graph reads the expert weights
    assert (eager.converted, eager.unseen) == (0, eager.present) and eager.present == 24, eager
    assert family_table.readme_rows(README.read_text()).get(family) == family_table.row(family, cells), (
        f"the README's row for {family} is not what was measured: "
        f"python -m mxfp8_compile.tools.family_table --write README.md {family}"
    )


@pytest.mark.slow
def test_write_replaces_only_the_rows_measured(tmp_path: pathlib.Path) -> None:
    readme = tmp_path / "README.md"
    text = README.read_text()
    stale = text.replace(family_table.readme_rows(text)["mixtral"], "| mixtral | stale | | |")
    readme.write_text(stale)
    assert family_table.main(["--write", str(readme), "mixtral"]) == 0
    assert readme.read_text() == text  # the mixtral row measured again, every other line as it was
