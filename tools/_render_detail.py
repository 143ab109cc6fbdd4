"""The rewrite of each GEMM, as SVG: one picture per layer group (``layers.0``, ``lm_head``).

A row per GEMM: modules in execution order and, within a module, forward, dgrad, wgrad. On
the left the GEMM's module path, role, layout and shapes; in the middle its rewrite, data
flowing left to right; on the right the decision (the reason sentence for a kept GEMM). A
converted GEMM's row holds the operands (grey, named for what they are: ``x``, ``weight``,
``dy``, ``offs``), the casts and scale rearranges the plugin inserted (blue, purple) and the
MXFP8 GEMM (green); a kept GEMM's row holds its operands and the GEMM (amber or red, as in
the conversion map). Boxes are labelled with their op; graph-internal node names are in the
hover only. The inserted views (``permute``) and scale decodes (aten ops traced from
``numerics``) are not boxes: an edge through them is dashed and its hover lists them.

Layout: a row's boxes sit in columns by their distance to the GEMM (the GEMMs of all rows line
up in one column) and edges run orthogonally in the channels between columns, each source on a
vertical track of its own, entering its target at a port of its own; an edge spanning several
columns drops into a lane of its own under the row's boxes. No edge crosses a box. A layer
taller than ``SCREEN_H`` flows into two columns of rows, read left then right.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import networkx as nx
import torch
import torch.fx as fx

from mxfp8_compile.passes.report import Entry, PassReport, Role, format_bytes
from mxfp8_compile.tools import _render as r

FONT = 10.0
TITLE_FONT = 14.0
MARGIN = 16.0
BOX_PAD_X, BOX_PAD_Y = 6.0, 3.0
BOX_CHARS = 30  # an op or operand label wraps past this
SLOT_GAP = 4.0  # between boxes of a column
COL_GAP = 28.0  # between box columns: the channel edges run in
LANE_GAP = 5.0  # between the lanes under a row's boxes
ROW_PAD = 4.0
LABEL_CHARS = 30
VERDICT_CHARS = 32
FLOW_GAP = 36.0
SCREEN_H = 1000  # a layer taller than this in one column of rows flows into two
VIA_DASH = "4 3"
MODULE_RULE, ROW_RULE, FLOW_RULE = "#999999", "#e4e4e4", "#bbbbbb"  # lines between modules, rows, flows

# (fill, stroke, text) of the boxes that are not a GEMM
KIND_COLOURS = {
    "operand": ("#eeeeee", "#999999", r.TEXT_COLOUR),
    "quantize": ("#cfe2ff", "#3d6fb6", r.TEXT_COLOUR),
    "rearrange": ("#e2d9f3", "#6f42c1", r.TEXT_COLOUR),
    "other": ("#fff8e1", "#b38600", r.TEXT_COLOUR),
}
KIND_LEGEND = {
    "operand": "operand",
    "quantize": "cast to MX",
    "rearrange": "scale rearrange",
    "other": "other inserted op",
}

# The names of a GEMM's positional arguments, by op: the plugin's scaled GEMMs all take
# (A data, A scales, B data, B scales, offs, ...).
_MX_SLOTS = ("A", "A scales", "B", "B scales", "offs")
_ATEN_SLOTS = {
    "mm": ("A", "B"),
    "addmm": ("bias", "A", "B"),
    "_grouped_mm": ("A", "B", "offs"),
    "grouped_mm_fallback": ("A", "B", "offs"),
}
# What A and B are, by role (y = x W^T, dx = dy W, dW = dy^T x)
_OPERAND_NAMES = {
    Role.FORWARD: {"A": "x", "B": "weight"},
    Role.DGRAD: {"A": "dy", "B": "weight"},
    Role.WGRAD: {"A": "dy", "B": "x"},
}
# MX data or scales made for another GEMM, by the pass that made them (``meta["mxfp8"]``'s prefix)
_MADE_BY = collections.defaultdict(lambda: "MX", {
    "rewrite_gemms": "MX, shared",  # cast for another GEMM of the same tensor (or merged by CSE)
    "hoist_quantize": "MX, before all-to-all",
})
_NOT_FED = 1 << 10  # the order of a box that feeds no GEMM argument (a bias add after it): last
_Track = tuple[str, str]  # ("source", its node) or ("edge", "src->dst" of an edge spanning columns)


@dataclasses.dataclass
class _Box:
    name: str  # the graph node's
    kind: str  # a KIND_COLOURS key, or a status (r.CONVERTED, r.POLICY, r.CANNOT) for the GEMM
    label: list[str]
    hover: str
    order: tuple[int, int]  # (first GEMM argument it feeds, graph position): top to bottom
    depth: int = 0  # edges from here to the row's last box; the column counts from the right
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0

    @property
    def centre(self) -> float:
        return self.y + self.h / 2


@dataclasses.dataclass
class _Edge:
    src: str
    dst: str
    via: list[str]  # the contracted nodes it runs through, described
    points: list[tuple[float, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Row:
    entry: Entry
    boxes: dict[str, _Box]
    edges: list[_Edge]
    label: list[str]  # lines: module path (bold), role and layout, shapes
    bold: int  # how many of the label's lines are the module path
    verdict: list[str]
    height: float = 0.0  # set by the layout


def region_svgs(graph: fx.Graph, report: PassReport) -> dict[str, str]:
    """One picture per layer group of ``report`` (the GEMMs of ``graph``, the graph after the
    passes), keyed by the group's file stem (``r.group_stem``), in execution order."""
    nodes = {n.name: n for n in graph.nodes}
    position = {name: i for i, name in enumerate(nodes)}
    inserted: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if isinstance(node.meta.get("mxfp8"), str):
            inserted.setdefault(node.meta["mxfp8"], []).append(node)
    pictures = {}
    for group in r.groups(report):
        rows = [_row(entry, ordinal, nodes, inserted, position)
                for module in group.modules for entry, ordinal in _with_ordinals(module)]
        pictures[r.group_stem(group.name)] = _picture(group, rows, report)
    return pictures


def _with_ordinals(module: r.Module) -> list[tuple[Entry, str]]:
    """The module's GEMMs in role order, each with ``GEMM k of n`` among those of its role
    (or "" when it is the only one)."""
    out = []
    for role in r.ROLES:
        entries = module.of_role(role)
        out += [(e, f"GEMM {k} of {len(entries)}" if len(entries) > 1 else "") for k, e in enumerate(entries, 1)]
    return out


# --------------------------------------------------------------------------------------------
# A row's graph: the boxes and edges of one GEMM.
# --------------------------------------------------------------------------------------------


def _op_name(node: fx.Node) -> str:
    """The op a node calls (``quantize``, ``scaled_grouped_mm``, ``permute``)."""
    target = node.target
    return getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)


def _is_mxfp8_op(node: fx.Node) -> bool:
    return getattr(node.target, "namespace", None) == "mxfp8"


def _source(node: fx.Node) -> fx.Node:
    """A ``getitem`` is drawn as the node whose output it picks."""
    if node.target is operator.getitem:
        picked = node.args[0]
        assert isinstance(picked, fx.Node), node.format_node()
        return picked
    return node


def _members(entry: Entry, nodes: dict[str, fx.Node], inserted: dict[str, list[fx.Node]]) -> list[fx.Node]:
    """The nodes that stand for the GEMM: what the rewrite inserted for it (getitems aside),
    or the GEMM node itself when it was kept."""
    if entry.converted:
        return [n for n in inserted.get(f"rewrite_gemms:{entry.site.label}", []) if n.target is not operator.getitem]
    return [nodes[entry.site.node]] if entry.site.node in nodes else []


def _gemm_node(entry: Entry, members: list[fx.Node]) -> fx.Node | None:
    if not entry.converted:
        return members[0] if members else None
    return next((n for n in members if _is_mxfp8_op(n) and _op_name(n).startswith("scaled_")), None)


def _row(entry: Entry, ordinal: str, nodes: dict[str, fx.Node], inserted: dict[str, list[fx.Node]],
         position: dict[str, int]) -> _Row:
    """One GEMM's boxes and edges (not yet placed), label and verdict."""
    members = _members(entry, nodes, inserted)
    gemm = _gemm_node(entry, members)
    flow = nx.DiGraph()
    for member in members:
        flow.add_node(member.name)
        for arg in member.all_input_nodes:
            source = _source(arg)
            if not (source.meta.get("mxfp8") and not source.all_input_nodes):
                flow.add_edge(source.name, member.name)  # but not a constant of another row's, merged by CSE
    feeds = _argument_slots(flow, gemm)
    edges = _contract(flow, [m for m in members if m is not gemm and not _is_mxfp8_op(m) and flow.out_degree(m.name)])
    member_names = {m.name for m in members}
    boxes = {}
    for name, depth in _depths(flow).items():
        node = nodes[name]
        order = (min(feeds.get(name, {}), default=_NOT_FED), position.get(name, 0))
        if name in member_names:
            kind, label = (r.status(entry) if node is gemm else _kind(node)), _op_name(node)
        else:
            kind, label = "operand", _operand_label(node, set(feeds.get(name, {}).values()), entry.site.role)
        boxes[name] = _Box(name, kind, r.wrap(label, BOX_CHARS), _node_hover(node), order, depth)
    fqn_lines = r.wrap(entry.site.fqn or r.NO_MODULE, LABEL_CHARS)
    role = f"{entry.site.role.value} {entry.site.layout.value}" + (f", {ordinal}" if ordinal else "")
    label = fqn_lines + r.wrap(role, LABEL_CHARS) + r.wrap(r.shapes_text(entry), LABEL_CHARS)
    return _Row(entry, boxes, edges, label, len(fqn_lines), _verdict(entry))


def _argument_slots(flow: nx.DiGraph, gemm: fx.Node | None) -> dict[str, dict[int, str]]:
    """For each node of ``flow``: the GEMM's arguments it feeds, by position, with their
    names (``A``, ``B scales``, ``offs``; "" for a position the op's table does not name)."""
    if gemm is None:
        return {}
    names = _MX_SLOTS if _is_mxfp8_op(gemm) else _ATEN_SLOTS.get(_op_name(gemm), ())
    feeds: dict[str, dict[int, str]] = {}
    for i, arg in enumerate(gemm.args):
        if isinstance(arg, fx.Node):
            start = _source(arg).name
            for name in nx.ancestors(flow, start) | {start}:
                feeds.setdefault(name, {})[i] = names[i] if i < len(names) else ""
    return feeds


def _contract(flow: nx.DiGraph, passed: list[fx.Node]) -> list[_Edge]:
    """Remove ``passed`` from ``flow`` (in place), joining each one's inputs to its users;
    return the edges left, each with the removed nodes it runs through."""
    via: dict[tuple[str, str], list[str]] = {edge: [] for edge in flow.edges}
    for node in passed:
        for pred in list(flow.predecessors(node.name)):
            for succ in list(flow.successors(node.name)):
                through = via.get((pred, node.name), []) + [_describe(node)] + via.get((node.name, succ), [])
                via[(pred, succ)] = via.get((pred, succ), []) + through
                flow.add_edge(pred, succ)
        flow.remove_node(node.name)
    return [_Edge(src, dst, via[(src, dst)]) for src, dst in flow.edges]


def _depths(flow: nx.DiGraph) -> dict[str, int]:
    """Each node's longest path to a node without users."""
    depth: dict[str, int] = {}
    for name in reversed(list(nx.topological_sort(flow))):
        depth[name] = 1 + max((depth[s] for s in flow.successors(name)), default=-1)
    return depth


def _kind(node: fx.Node) -> str:
    name = _op_name(node)
    if "quantize" in name:
        return "quantize"
    if "blocked" in name or "rebase" in name:
        return "rearrange"
    return "other"


def _operand_label(node: fx.Node, slots: set[str], role: Role) -> str:
    """What an operand is: ``offs`` (integer), else ``x``, ``weight``, ``dy`` from the GEMM
    data argument (A or B) it feeds (the scales and offsets a cast derives from it do not
    count), ``dy scales`` when it feeds scales alone, ``bias``; else the op that made it. MX
    data or scales the plugin made elsewhere (a cast shared with another GEMM, or moved above
    an all-to-all) say so."""
    data = slots & {"A", "B"}
    sides = {slot.split()[0] for slot in slots if slot}
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype in (torch.int32, torch.int64):
        label = "offs"  # MX data is fp8 and scales uint8: an integer operand is group offsets
    elif len(data) == 1:
        (side,) = data
        label = _OPERAND_NAMES[role][side]
    elif not data and len(sides) == 1:  # the scales of A or B alone, or offs, or a bias
        (side,) = sides
        label = f"{_OPERAND_NAMES[role][side]} scales" if side in _OPERAND_NAMES[role] else side
    else:
        return _producer(node)
    made_by = str(node.meta.get("mxfp8", "")).split(":")[0]
    return f"{label} ({_MADE_BY[made_by]})" if made_by and _from_a_cast(node) else label


def _from_a_cast(node: fx.Node) -> bool:
    """Whether a node the plugin made holds MX data or scales: a cast's output, or what the
    plugin made of one (views, scale decodes, all-to-alls), followed through first inputs."""
    while node.meta.get("mxfp8"):
        if _is_mxfp8_op(node):
            return "quantize" in _op_name(node)
        if not node.all_input_nodes:
            return False
        node = _source(node.all_input_nodes[0])
    return False


def _producer(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "tangent" if node.name.startswith("tangents") else "graph input"
    return _op_name(node) if node.op == "call_function" else node.op


def _describe(node: fx.Node) -> str:
    """``permute_default_3 = aten.permute.default``: a node for the hover."""
    return f"{node.name} = {node.target}" if node.op == "call_function" else f"{node.name} ({node.op})"


def _node_hover(node: fx.Node) -> str:
    """The node, what it calls, its values' shapes and dtypes, and the pass that made it."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    shapes = ", ".join(f"({', '.join(map(str, v.shape))}) {str(v.dtype).removeprefix('torch.')}"
                       for v in vals if isinstance(v, torch.Tensor))
    made_by = f"made by {node.meta['mxfp8']}" if node.meta.get("mxfp8") else ""
    return "\n".join(filter(None, [_describe(node), shapes, made_by]))


def _verdict(entry: Entry) -> list[str]:
    """Converted: that and the operand bytes; kept: the reason, name and sentence, wrapped."""
    site = entry.site
    if entry.converted:
        moved = [] if site.bytes_before is None else [
            f"operands {format_bytes(site.bytes_before)} -> {format_bytes(site.bytes_after)}"]
        return ["converted to MXFP8", *moved]
    return r.wrap(f"{entry.decision.reason.name}: {entry.decision}", VERDICT_CHARS)


# --------------------------------------------------------------------------------------------
# Layout and drawing.
# --------------------------------------------------------------------------------------------


def _line_h(size: float = FONT) -> float:
    return size * r.LINE_H


def _picture(group: r.Group, rows: list[_Row], report: PassReport) -> str:
    """The SVG of a layer's rows: box columns sized to their widest label and shared by all
    rows (the GEMMs line up), the rows placed and flowed into one or two columns."""
    columns = 1 + max((b.depth for row in rows for b in row.boxes.values()), default=0)
    widths = [0.0] * columns
    for row in rows:
        for box in row.boxes.values():
            box.w = max(r.text_width(line, FONT) for line in box.label) + 2 * BOX_PAD_X  # _place widens it
            box.h = len(box.label) * _line_h() + 2 * BOX_PAD_Y
            col = columns - 1 - box.depth
            widths[col] = max(widths[col], box.w)
    label_w = LABEL_CHARS * FONT * r.CHAR_W
    col_x = [label_w + COL_GAP + sum(widths[:c]) + c * COL_GAP for c in range(columns)]
    verdict_x = col_x[-1] + widths[-1] + COL_GAP
    row_w = verdict_x + max(r.text_width(line, FONT) for row in rows for line in row.verdict)
    for row in rows:
        _place(row, columns, col_x, widths)
    flows = _flow(rows)
    width = 2 * MARGIN + len(flows) * row_w + (len(flows) - 1) * FLOW_GAP
    header = _header(group, report, width - 2 * MARGIN)
    width = header.width + 2 * MARGIN
    top = MARGIN + header.height
    height = top + max(sum(row.height for row in flow) for flow in flows) + MARGIN

    svg = r.svg_root(width, height, FONT)
    header.draw(svg, MARGIN, MARGIN)
    for i, flow in enumerate(flows):
        x, y = MARGIN + i * (row_w + FLOW_GAP), top
        if i:
            ET.SubElement(svg, "line", x1=f"{x - FLOW_GAP / 2:.1f}", y1=f"{top:.1f}", x2=f"{x - FLOW_GAP / 2:.1f}",
                          y2=f"{height - MARGIN:.1f}", stroke=FLOW_RULE)
        previous = None
        for row in flow:
            new_module = previous is None or row.entry.site.fqn != previous
            ET.SubElement(svg, "line", x1=f"{x:.1f}", y1=f"{y:.1f}", x2=f"{x + row_w:.1f}", y2=f"{y:.1f}",
                          stroke=MODULE_RULE if new_module else ROW_RULE)
            _draw_row(svg, row, x, y, verdict_x)
            previous, y = row.entry.site.fqn, y + row.height
    return r.to_string(svg)


def _flow(rows: list[_Row]) -> list[list[_Row]]:
    """The rows in one column, or in two of balanced heights when one is taller than
    ``SCREEN_H``; split between any two rows (each row names its module)."""
    heights = [row.height for row in rows]
    if sum(heights) <= SCREEN_H or len(rows) < 2:
        return [rows]
    split = min(range(1, len(rows)), key=lambda i: max(sum(heights[:i]), sum(heights[i:])))
    return [rows[:split], rows[split:]]


def _place(row: _Row, columns: int, col_x: Sequence[float], widths: Sequence[float]) -> None:
    """Position the row's boxes (in row coordinates: the row's top is 0), route its edges,
    and set its height. In a column, boxes go top to bottom by ``_Box.order``, each centred on
    its inputs where there is room."""
    by_column: dict[int, list[_Box]] = {}
    for box in row.boxes.values():
        by_column.setdefault(columns - 1 - box.depth, []).append(box)
    inputs: dict[str, list[_Box]] = {}
    for edge in row.edges:
        inputs.setdefault(edge.dst, []).append(row.boxes[edge.src])
    for col in sorted(by_column):
        bottom = ROW_PAD - SLOT_GAP
        for box in sorted(by_column[col], key=lambda b: b.order):
            box.x, box.w = col_x[col], widths[col]
            sources = inputs.get(box.name, [])
            wanted = sum(s.centre for s in sources) / len(sources) - box.h / 2 if sources else 0.0
            box.y = max(bottom + SLOT_GAP, wanted)
            bottom = box.y + box.h
    boxes_bottom = max((b.y + b.h for b in row.boxes.values()), default=ROW_PAD)
    lanes = _route(row, columns, col_x, widths, boxes_bottom)
    text_h = max(len(row.label), len(row.verdict)) * _line_h() + 2 * ROW_PAD
    row.height = max(boxes_bottom + lanes * LANE_GAP + ROW_PAD, text_h)


def _route(row: _Row, columns: int, col_x: Sequence[float], widths: Sequence[float], boxes_bottom: float) -> int:
    """Set each edge's points: right out of its source to the source's track in the channel
    after it, along the track to the target's port (or, two columns or more away, down to a
    lane of its own under the boxes, along it to a track of its own in the channel before the
    target, and up or down to the port), right into the target. Returns the lanes used."""
    column = {name: columns - 1 - box.depth for name, box in row.boxes.items()}
    lanes = {(e.src, e.dst): i for i, e in enumerate(e for e in row.edges if column[e.dst] - column[e.src] > 1)}
    track = _tracks(row, column, lanes, col_x, widths)
    port = _ports(row)
    for edge in row.edges:
        src, dst, key = row.boxes[edge.src], row.boxes[edge.dst], (edge.src, edge.dst)
        out_x, port_y = track[("source", edge.src)], port[key]
        points = [(src.x + src.w, src.centre), (out_x, src.centre)]
        if key in lanes:
            lane_y, in_x = boxes_bottom + LANE_GAP * (lanes[key] + 1), track[("edge", "->".join(key))]
            points += [(out_x, lane_y), (in_x, lane_y), (in_x, port_y)]
        else:
            points.append((out_x, port_y))
        edge.points = _simplified(points + [(dst.x, port_y)])
    return len(lanes)


def _tracks(row: _Row, column: dict[str, int], lanes: dict[tuple[str, str], int], col_x: Sequence[float],
            widths: Sequence[float]) -> dict[_Track, float]:
    """The x of each vertical track. The channel after a column holds one per source in the
    column (its edges fan out from it) and one per lane's edge ending in the next column,
    spread evenly, in the order of the y each heads for (fewer crossings)."""
    owners: dict[int, dict[_Track, float]] = {}
    for edge in row.edges:
        owners.setdefault(column[edge.src], {})[("source", edge.src)] = row.boxes[edge.src].centre
    for src, dst in lanes:
        owners.setdefault(column[dst] - 1, {})[("edge", f"{src}->{dst}")] = row.boxes[dst].centre
    track = {}
    for channel, heading_for in owners.items():
        left = col_x[channel] + widths[channel]
        for k, key in enumerate(sorted(heading_for, key=heading_for.__getitem__)):
            track[key] = left + COL_GAP * (k + 1) / (len(heading_for) + 1)
    return track


def _ports(row: _Row) -> dict[tuple[str, str], float]:
    """The y where each edge enters its target: spread over the target's left side, in the
    order of the sources' y."""
    incoming: dict[str, list[_Edge]] = {}
    for edge in row.edges:
        incoming.setdefault(edge.dst, []).append(edge)
    port = {}
    for dst, edges in incoming.items():
        box = row.boxes[dst]
        for k, edge in enumerate(sorted(edges, key=lambda e: row.boxes[e.src].centre)):
            port[(edge.src, edge.dst)] = box.y + box.h * (k + 1) / (len(edges) + 1)
    return port


def _simplified(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Without repeated points and the middle points of straight runs."""
    out: list[tuple[float, float]] = []
    for p in points:
        if out and p == out[-1]:
            continue
        if len(out) >= 2 and (out[-2][0] == out[-1][0] == p[0] or out[-2][1] == out[-1][1] == p[1]):
            out[-1] = p
        else:
            out.append(p)
    return out


def _header(group: r.Group, report: PassReport, width: float) -> r.Header:
    """Title, counts, how to read the rows, and the legend of boxes and edges."""
    items = [r.LegendItem(label, KIND_COLOURS[kind]) for kind, label in KIND_LEGEND.items()]
    items += [r.LegendItem("MXFP8 GEMM", r.STATUS_COLOURS[r.CONVERTED]),
              r.LegendItem("GEMM kept by the config", r.STATUS_COLOURS[r.POLICY]),
              r.LegendItem("GEMM the MX path cannot take", r.STATUS_COLOURS[r.CANNOT]),
              r.LegendItem("through inserted views or scale decoding", None, VIA_DASH)]
    order = "forward, dgrad, wgrad" if report.graph == "training" else "forward GEMMs"
    note = f"{r.counts_text(group.entries)}. Rows: modules in execution order; {order}. Hover a box for its graph node."
    return r.Header.fitted(f"{group.name}: the rewrite of each GEMM ({report.graph} graph, target {report.target})",
                           note, items, TITLE_FONT, FONT + 1, width)


def _draw_row(svg: ET.Element, row: _Row, x: float, y: float, verdict_x: float) -> None:
    """The row with its top-left corner at (x, y): label, edges, boxes, verdict."""
    site = row.entry.site
    group = ET.SubElement(svg, "g", id=f"row-{r.gemm_id(row.entry)}",
                          attrib={"class": "row", "data-fqn": site.fqn, "data-role": site.role.value})
    label = r.add_text(group, x, y + ROW_PAD + r.ASCENT * FONT, row.label, FONT)
    for span in list(label)[:row.bold]:
        span.set("font-weight", "bold")
    r.add_title(label, r.entry_hover(row.entry))
    for edge in row.edges:
        points = " ".join(f"{x + px:.1f},{y + py:.1f}" for px, py in edge.points)
        line = ET.SubElement(group, "polyline", points=points, fill="none", stroke=r.EDGE_COLOUR,
                             attrib={"class": "edge", "marker-end": "url(#arrow)"})
        if edge.via:
            line.set("stroke-dasharray", VIA_DASH)
            r.add_title(line, "through " + "; ".join(edge.via))
    for box in row.boxes.values():
        _draw_box(group, box, x, y)
    ink = r.STATUS_COLOURS[r.status(row.entry)][2]
    r.add_text(group, x + verdict_x, y + ROW_PAD + r.ASCENT * FONT, row.verdict, FONT, fill=ink)


def _draw_box(parent: ET.Element, box: _Box, x: float, y: float) -> None:
    """The box of a row whose top-left corner is at (x, y); its node in the hover."""
    fill, stroke, ink = KIND_COLOURS[box.kind] if box.kind in KIND_COLOURS else r.STATUS_COLOURS[box.kind]
    group = ET.SubElement(parent, "g", attrib={"class": f"box {box.kind}"})
    r.add_title(group, box.hover)
    r.add_rect(group, x + box.x, y + box.y, box.w, box.h, fill, stroke, rx="3")
    r.add_text(group, x + box.x + BOX_PAD_X, y + box.y + BOX_PAD_Y + r.ASCENT * FONT, box.label, FONT, fill=ink)
