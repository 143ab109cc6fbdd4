"""Draw the rewritten region of a graph as SVG: one row per GEMM, left to right.

A converted GEMM's row holds its operands (grey), the nodes the rewrite inserted for it (views
dashed, quantize blue, rearrange purple, the scaled GEMM green) and the edges between them; a
GEMM kept in high precision is a red box with its reason. Rows are grouped by module FQN, so a
4-layer MoE reads as a list of layers. Columns come from networkx's topological generations of
each row's subgraph.
"""

from __future__ import annotations

import operator
import xml.etree.ElementTree as ET

import networkx as nx
import torch.fx as fx

from mxfp8_compile.passes.report import PassReport

ROW_H, BOX_W, BOX_H, GAP, LABEL_W, TOP = 40, 170, 30, 26, 330, 40
STYLE = {
    "operand": ("#eeeeee", "#999999", ""),
    "view": ("#fafafa", "#999999", "4 2"),
    "quantize": ("#cfe2ff", "#3d6fb6", ""),
    "rearrange": ("#e2d9f3", "#6f42c1", ""),
    "gemm": ("#c7f0d2", "#2e8540", ""),
    "other": ("#fff3cd", "#b38600", ""),
    "skipped": ("#f8d7da", "#b02a37", ""),
}


def _kind(node: fx.Node) -> str:
    name = str(node.target)
    if "quantize" in name:
        return "quantize"
    if "blocked" in name or "rebase" in name:
        return "rearrange"
    if "scaled" in name:
        return "gemm"
    if "permute" in name or "view" in name or "transpose" in name:
        return "view"
    return "other"


def _short(node: fx.Node) -> str:
    """The op a node calls (``quantize``, ``scaled_grouped_mm``, ``permute``), or its name."""
    if node.op != "call_function":
        return node.name
    return getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target))


def _row_graph(graph_nodes: dict[str, fx.Node], label: str, node_name: str, converted: bool) -> nx.DiGraph:
    """The subgraph of one GEMM: inserted nodes (or the kept GEMM) and the operands they read."""
    row = nx.DiGraph()
    provenance = f"rewrite_gemms:{label}"
    members = (
        [n for n in graph_nodes.values() if n.meta.get("mxfp8") == provenance and n.target is not operator.getitem]
        if converted
        else [graph_nodes[node_name]] if node_name in graph_nodes else []
    )
    member_names = {n.name for n in members}

    def producer(arg: fx.Node) -> fx.Node:
        # getitem nodes are drawn as their producer
        return arg.args[0] if arg.target is operator.getitem else arg

    for node in members:
        row.add_node(node.name, label=_short(node), kind=_kind(node) if converted else "skipped")
        for arg in node.all_input_nodes:
            source = producer(arg)
            if source.name not in member_names and source.name not in row:
                row.add_node(source.name, label=source.name, kind="operand")
            row.add_edge(source.name, node.name)
    return row


def region_svg(graph: fx.Graph, report: PassReport) -> str:
    """SVG of every GEMM of ``report`` as it stands in ``graph`` (the graph after the passes)."""
    nodes = {n.name: n for n in graph.nodes}
    entries = sorted(report.entries, key=lambda e: (e.site.fqn, e.site.role.value, e.site.label))
    rows = [(e, _row_graph(nodes, e.site.label, e.site.node, e.converted)) for e in entries]
    generations = [[sorted(g) for g in nx.topological_generations(row)] for _, row in rows]
    columns = max((len(gens) for gens in generations), default=1)
    heights = [max((len(g) for g in gens), default=1) * (BOX_H + 8) + 12 for gens in generations]
    width = LABEL_W + columns * (BOX_W + GAP) + 640
    fqns = sorted({e.site.fqn for e, _ in rows})
    height = TOP + sum(heights) + ROW_H * len(fqns) + 20

    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(width), height=str(height),
                     viewBox=f"0 0 {width} {height}", attrib={"font-family": "monospace", "font-size": "11"})
    ET.SubElement(svg, "rect", width=str(width), height=str(height), fill="white")
    title = ET.SubElement(svg, "text", x="10", y="22", attrib={"font-size": "14", "font-weight": "bold"})
    converted = sum(e.converted for e, _ in rows)
    title.text = (f"mxfp8 rewrite: {report.graph} graph, target {report.target}: {converted} GEMMs converted, "
                  f"{len(rows) - converted} kept")
    y = TOP
    current_fqn = None
    for (entry, row), gens, row_height in zip(rows, generations, heights):
        site = entry.site
        if site.fqn != current_fqn:
            current_fqn = site.fqn
            header = ET.SubElement(svg, "text", x="10", y=str(y + 28), attrib={"font-weight": "bold"})
            header.text = site.fqn or "(no module)"
            y += ROW_H
        group = ET.SubElement(svg, "g", id=f"site-{site.label}")
        ET.SubElement(group, "line", x1="10", y1=str(y + 2), x2=str(width - 10), y2=str(y + 2), stroke="#dddddd")
        label = ET.SubElement(group, "text", x="20", y=str(y + 24))
        label.text = f"{site.label}  {site.role.value} {site.layout.value}"
        anchor: dict[str, tuple[float, float]] = {}
        for column, generation in enumerate(gens):
            for i, name in enumerate(generation):
                x, top = LABEL_W + column * (BOX_W + GAP), y + 8 + i * (BOX_H + 8)
                anchor[name] = (x, top + BOX_H / 2)
                _box(group, name, row.nodes[name], x, top)
        for src, dst in row.edges:
            (x1, y1), (x2, y2) = anchor[src], anchor[dst]
            ET.SubElement(group, "line", x1=str(x1 + BOX_W), y1=str(y1), x2=str(x2), y2=str(y2), stroke="#555555")
        x_verdict = str(LABEL_W + columns * (BOX_W + GAP))
        verdict = ET.SubElement(group, "text", x=x_verdict, y=str(y + 24),
                                fill="#2e8540" if entry.converted else "#b02a37")
        if entry.converted:
            verdict.text = "converted"
        else:
            verdict.text = f"kept in high precision: {entry.decision.reason.name}"
            ET.SubElement(verdict, "title").text = str(entry.decision)
            why = ET.SubElement(group, "text", x=x_verdict, y=str(y + 40), fill="#b02a37",
                                attrib={"font-size": "10"})
            detail = str(entry.decision)
            why.text = detail if len(detail) <= 90 else detail[:89] + "…"
        y += row_height
    ET.indent(svg)
    return ET.tostring(svg, encoding="unicode")


def _box(parent: ET.Element, name: str, attrs: dict, x: float, y: float) -> None:
    fill, stroke, dash = STYLE[attrs["kind"]]
    group = ET.SubElement(parent, "g", id=f"node-{name}", attrib={"class": attrs["kind"]})
    ET.SubElement(group, "title").text = f"{name}: {attrs['label']}"
    rect = ET.SubElement(group, "rect", x=str(x), y=str(y), width=str(BOX_W), height=str(BOX_H), rx="4",
                         fill=fill, stroke=stroke)
    if dash:
        rect.set("stroke-dasharray", dash)
    text = ET.SubElement(group, "text", x=str(x + 6), y=str(y + 19))
    number = name.rsplit("_", 1)[-1]
    label = f"{attrs['label']} ({number})" if attrs["kind"] != "operand" and number.isdigit() else attrs["label"]
    text.text = label if len(label) <= 24 else label[:23] + "…"
