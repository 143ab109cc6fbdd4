"""The dump's pictures, read back as SVG: the conversion map (a row per module, a column per
role) and the per-layer rewrite detail (a row per GEMM, its operands, casts and MX GEMM).

What a reader relies on is checked on the emitted SVG: execution order, whole labels, every
GEMM once with its decision's colour, graph-internal names only in hovers, and edges that go
around boxes, not through them.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator

import pytest
import torch.fx as fx

from mxfp8_compile.examples.moe import MoEConfig, build
from mxfp8_compile.passes.report import Entry, PassReport, Role
from mxfp8_compile.tools import _render as r
from mxfp8_compile.tools._render_detail import region_svgs
from mxfp8_compile.tools._render_map import conversion_map_svg
from mxfp8_compile.tools.dump import DumpResult, dump

SVG = "{http://www.w3.org/2000/svg}"
LAYERS = 2
# The example's modules in the order its forward runs them: Attention.forward projects q, k, v
# (in that order, one generator) then o; MoE.forward routes through the gate, runs the experts,
# then the shared expert, whose w2(silu(w1(x)) * w3(x)) calls w1, w3, w2.
BLOCK = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "moe.gate", "moe.experts",
         "moe.shared_expert.w1", "moe.shared_expert.w3", "moe.shared_expert.w2"]
MODULES = [f"layers.{i}.{m}" for i in range(LAYERS) for m in BLOCK] + ["lm_head"]
EPS = 0.5


@pytest.fixture(scope="module")
def trained() -> DumpResult:
    model, inputs = build(MoEConfig(layers=LAYERS))
    return dump(model, inputs, train=True)


@pytest.fixture(scope="module")
def inference() -> DumpResult:
    model, inputs = build(MoEConfig(layers=LAYERS))
    return dump(model, inputs, train=False)


def _classes(element: ET.Element) -> list[str]:
    return element.get("class", "").split()


def _of_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if name in _classes(e)]


def _visible(element: ET.Element) -> Iterator[str]:
    """The text of ``element`` a reader sees: everything but the hovers (``<title>``)."""
    if element.tag == SVG + "title":
        return
    if element.text:
        yield element.text
    for child in element:
        yield from _visible(child)
        if child.tail:
            yield child.tail


def _text(element: ET.Element) -> str:
    """A ``<text>`` element's lines joined: the whole label, if wrapping cut nothing."""
    return "".join(_visible(element))


# --------------------------------------------------------------------------------------------
# Text helpers.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,width", [
    ("layers.0.moe.shared_expert.w1", 12),
    ("converted to MXFP8 (operands 320.00 KiB -> 165.00 KiB)", 20),
    ("quantize_rows_and_token_groups", 8),
    ("KEEP_BF16: kept in bf16 by policy (Config.keep_bf16_roles, keep_bf16_modules)", 30),
    ("short", 30),
])
def test_wrap_cuts_nothing_and_keeps_numbers_whole(text: str, width: int) -> None:
    lines = r.wrap(text, width)
    assert "".join(lines) == text
    assert all(len(line) <= width for line in lines)
    assert not any(re.search(r"\d\.$", a) and re.match(r"\d", b) for a, b in zip(lines, lines[1:])), lines


@pytest.mark.parametrize("fqn,group", [
    ("layers.0.attn.q_proj", "layers.0"),
    ("model.layers.12.mlp.experts", "model.layers.12"),
    ("lm_head", "lm_head"),
    ("encoder.proj", "encoder"),
    ("", r.NO_MODULE),
])
def test_layer_group_is_the_prefix_through_the_first_number(fqn: str, group: str) -> None:
    assert r.layer_group(fqn) == group


# --------------------------------------------------------------------------------------------
# The conversion map.
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_map_rows_are_modules_in_execution_order_under_layer_headings(trained: DumpResult) -> None:
    root = ET.fromstring(conversion_map_svg(trained.graphs[0].report))
    groups = _of_class(root, "group")
    assert [g.get("data-group") for g in groups] == ["layers.0", "layers.1", "lm_head"]
    rows = [(g.get("data-group"), m) for g in groups for m in _of_class(g, "module")]
    assert [m.get("data-fqn") for _, m in rows] == MODULES
    for group, module in rows:
        label = _text(module.find(SVG + "text"))
        assert module.get("data-fqn") in (label, f"{group}.{label}")  # whole: the heading is its prefix
    assert "…" not in ET.tostring(root, encoding="unicode")


@pytest.mark.slow
def test_map_has_every_gemm_once_in_its_role_column_in_its_decisions_colour(trained: DumpResult) -> None:
    report = trained.graphs[0].report
    root = ET.fromstring(conversion_map_svg(report))
    for module in _of_class(root, "module"):
        assert [c.get("data-role") for c in _of_class(module, "cell")] == ["forward", "dgrad", "wgrad"]
    cells = {e.get("id"): (module.get("data-fqn"), cell.get("data-role"), e)
             for module in _of_class(root, "module") for cell in _of_class(module, "cell")
             for e in _of_class(cell, "gemm")}
    ids = Counter(e.get("id") for e in _of_class(root, "gemm"))
    assert ids == Counter(r.gemm_id(entry) for entry in report.entries)
    assert max(ids.values()) == 1
    kept = 0
    for entry in report.entries:
        fqn, role, rect = cells[r.gemm_id(entry)]
        assert (fqn, role) == (entry.site.fqn, entry.site.role.value)
        assert rect.get("fill") == r.STATUS_COLOURS[r.status(entry)][0]
        hover = rect.find(SVG + "title").text
        assert r.shapes_text(entry) in hover and entry.site.label in hover
        if not entry.converted:
            kept += 1
            assert r.status(entry) == r.POLICY and str(entry.decision) in hover  # the router gate, lm_head
    assert kept == 3 * (LAYERS + 1)
    texts = [_text(t) for t in root.iter(SVG + "text")]
    assert "MXFP8 2Dx3D ×3" in texts and "MXFP8 2Dx2D ×3" in texts and "KEEP_BF16" in texts


def _with_layers(report: PassReport, layers: int) -> PassReport:
    """``report`` with layers.0's GEMMs repeated for ``layers`` layers (the map reads only the
    report, so a 4-layer map needs no 4-layer compile)."""
    first = [e for e in report.entries if e.site.fqn.startswith("layers.0.")]
    rest = [e for e in report.entries if r.layer_group(e.site.fqn) == "lm_head"]

    def moved(entry: Entry, layer: int) -> Entry:
        site = dataclasses.replace(entry.site, fqn=entry.site.fqn.replace("layers.0.", f"layers.{layer}.", 1),
                                   node=f"{entry.site.node}_l{layer}")
        return dataclasses.replace(entry, site=site)

    entries = [moved(e, layer) for layer in range(layers) for e in first] + rest
    return dataclasses.replace(report, entries=entries)


@pytest.mark.slow
def test_the_four_layer_map_fits_one_screen(trained: DumpResult) -> None:
    root = ET.fromstring(conversion_map_svg(_with_layers(trained.graphs[0].report, 4)))
    assert len(_of_class(root, "module")) == 4 * len(BLOCK) + 1
    assert float(root.get("width")) <= 1400 and float(root.get("height")) <= 900


@pytest.mark.slow
def test_a_forward_only_map_has_the_forward_column_alone(inference: DumpResult) -> None:
    report = inference.graphs[0].report
    root = ET.fromstring(conversion_map_svg(report))
    assert report.graph == "inference"
    assert [m.get("data-fqn") for m in _of_class(root, "module")] == MODULES
    assert {c.get("data-role") for c in _of_class(root, "cell")} == {"forward"}
    assert len(_of_class(root, "gemm")) == len(report.entries)


# --------------------------------------------------------------------------------------------
# The rewrite detail, one picture per layer.
# --------------------------------------------------------------------------------------------


def _pictures(result: DumpResult) -> dict[str, ET.Element]:
    graph = result.graphs[0]
    return {stem: ET.fromstring(svg) for stem, svg in region_svgs(graph.graph.graph, graph.report).items()}


@pytest.mark.slow
def test_detail_rows_go_by_module_then_forward_dgrad_wgrad(trained: DumpResult) -> None:
    pictures = _pictures(trained)
    assert list(pictures) == ["layers.0", "layers.1", "lm_head"]
    rows = [row for root in pictures.values() for row in _of_class(root, "row")]
    modules = [fqn for fqn, _ in _runs(row.get("data-fqn") for row in rows)]
    assert modules == MODULES  # each module's rows together, modules in execution order
    order = [role.value for role in r.ROLES]
    for fqn, _ in _runs(row.get("data-fqn") for row in rows):
        roles = [order.index(row.get("data-role")) for row in rows if row.get("data-fqn") == fqn]
        assert roles == sorted(roles), fqn
    ids = Counter(row.get("id") for row in rows)
    assert ids == Counter(f"row-{r.gemm_id(e)}" for e in trained.graphs[0].report.entries)


def _runs(values: Iterator[str | None]) -> list[tuple[str | None, int]]:
    runs: list[tuple[str | None, int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


@pytest.mark.slow
def test_detail_labels_are_whole_and_say_module_role_and_shapes(trained: DumpResult) -> None:
    entries = {f"row-{r.gemm_id(e)}": e for e in trained.graphs[0].report.entries}
    for root in _pictures(trained).values():
        assert "…" not in ET.tostring(root, encoding="unicode")
        for row in _of_class(root, "row"):
            entry = entries[row.get("id")]
            label, *_, verdict = row.findall(SVG + "text")
            text = _text(label)
            for part in (entry.site.fqn, f"{entry.site.role.value} {entry.site.layout.value}", r.shapes_text(entry)):
                assert part in text, (part, text)
            gemm_box = _of_class(row, r.status(entry))
            assert len(gemm_box) == 1  # one GEMM box per row, in its decision's colour
            op = _text(gemm_box[0].find(SVG + "text"))
            if entry.converted:
                assert op in ("scaled_mm", "scaled_grouped_mm") and "converted to MXFP8" in _text(verdict)
            else:
                assert op == "mm" and f"{entry.decision.reason.name}: {entry.decision}" == _text(verdict)
            operands = {_text(box.find(SVG + "text")) for box in _of_class(row, "operand")}
            names = {Role.FORWARD: {"x", "weight"}, Role.DGRAD: {"dy", "weight"}, Role.WGRAD: {"dy", "x"}}
            assert names[entry.site.role] & operands, operands


def _internal_names(graph: fx.Graph) -> set[str]:
    """Node names that are not simply the op they call (``mm_4``, ``permute_default_343``);
    not the graph's ``output``, a word the reasons use."""
    return {n.name for n in graph.nodes if n.op != "output" and n.name != getattr(n.target, "_opname", None)}


@pytest.mark.slow
def test_graph_node_names_only_in_hovers(trained: DumpResult) -> None:
    graph = trained.graphs[0].graph.graph
    internal = _internal_names(graph)
    pictures = [*_pictures(trained).values(), ET.fromstring(conversion_map_svg(trained.graphs[0].report))]
    for root in pictures:
        seen = set(re.findall(r"[A-Za-z_]\w*", " ".join(_visible(root))))
        assert not seen & internal, seen & internal
    for box in _of_class(pictures[0], "box"):
        assert box.find(SVG + "title").text.split()[0] in {n.name for n in graph.nodes}


def _rect(element: ET.Element) -> tuple[float, float, float, float]:
    rect = element.find(SVG + "rect")
    assert rect is not None
    x, y, w, h = (float(rect.get(k, "nan")) for k in ("x", "y", "width", "height"))
    return x, y, w, h


def _crosses(a: tuple[float, float], b: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    """Whether the axis-aligned segment a-b runs through the inside of ``box``; its border is
    outside, give or take the SVG's rounding to 0.1 px."""
    x, y, w, h = box[0] + EPS, box[1] + EPS, box[2] - 2 * EPS, box[3] - 2 * EPS
    if a[1] == b[1]:
        low, high = sorted((a[0], b[0]))
        return y < a[1] < y + h and low < x + w and high > x
    low, high = sorted((a[1], b[1]))
    return x < a[0] < x + w and low < y + h and high > y


@pytest.mark.slow
@pytest.mark.parametrize("which", ["trained", "inference"])
def test_edges_run_around_boxes(which: str, request: pytest.FixtureRequest) -> None:
    for root in _pictures(request.getfixturevalue(which)).values():
        boxes = [_rect(b) for b in _of_class(root, "box")]
        edges = _of_class(root, "edge")
        assert edges and boxes
        for edge in edges:
            points = [tuple(map(float, p.split(","))) for p in edge.get("points").split()]
            for a, b in zip(points, points[1:]):
                assert a[0] == b[0] or a[1] == b[1], (a, b)  # orthogonal
                assert not [box for box in boxes if _crosses(a, b, box)], (a, b)


@pytest.mark.slow
def test_a_forward_only_detail_has_forward_rows(inference: DumpResult) -> None:
    rows = [row for root in _pictures(inference).values() for row in _of_class(root, "row")]
    assert {row.get("data-role") for row in rows} == {"forward"}
    assert [fqn for fqn, _ in _runs(row.get("data-fqn") for row in rows)] == MODULES
