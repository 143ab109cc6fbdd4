"""The conversion map: every GEMM of a graph at a glance, as SVG.

One panel per layer group (``layers.0``, ..., ``lm_head``), panels left to right and then down
in execution order; in a panel one row per module in execution order and one column per role
(forward, dgrad, wgrad; forward alone for an inference graph, which has no backward). A cell
holds the module's GEMMs of that role: green ``MXFP8 <layout>`` when converted, amber or red
with the reason's name when kept (``_render.status``), grey ``—`` when there is none. Several
GEMMs of one role (the three expert projections of a grouped-experts module) are slices of the
cell, one ``<rect id="gemm-...">`` each, so that each has its own hover; slices with different
decisions go in bands one above the other, each labelled with its count (``×3``).
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

from mxfp8_compile.passes.report import Entry, PassReport, Role
from mxfp8_compile.tools import _render as r

FONT = 12.0
TITLE_FONT = 15.0
MAX_WIDTH = 1400  # panels side by side while they fit; the map grows downwards
MARGIN = 16.0
PANEL_GAP = 32.0  # between panels, both ways
CELL_GAP = 4.0
CELL_PAD = 12.0  # text to cell border, both sides together
MIN_CELL_W = 112.0
BAND_H = 20.0  # one band of a cell, and a one-line row
HEADING_H = 24.0
COLUMN_HEADER_H = 18.0
LABEL_CHARS = 36  # a module label wraps past this
TICK = 4.0  # the marks between the slices of a cell
BASELINE_DROP = 0.35  # a line's baseline under the middle of its band, in units of the font size
EMPTY = "—"
LEGEND = {
    r.CONVERTED: "converted to MXFP8 (its layout)",
    r.POLICY: "kept in high precision by the config (the reason)",
    r.CANNOT: "kept: the MX path cannot take it (the reason)",
}


@dataclasses.dataclass(frozen=True)
class _Row:
    """A module's row: its label lines and, per role, its GEMMs in bands of one cell text."""

    fqn: str
    label: list[str]
    cells: list[list[list[Entry]]]

    @property
    def height(self) -> float:
        lines = max([len(self.label), *(len(bands) for bands in self.cells)])
        return lines * BAND_H


@dataclasses.dataclass(frozen=True)
class _Panel:
    group: r.Group
    rows: list[_Row]

    @property
    def height(self) -> float:
        return HEADING_H + COLUMN_HEADER_H + sum(row.height + CELL_GAP for row in self.rows)


def conversion_map_svg(report: PassReport) -> str:
    """The conversion map of ``report``'s graph (see the module docstring)."""
    roles = list(r.ROLES) if report.graph == "training" else [Role.FORWARD]
    panels = [_Panel(g, [_row(m, g.name, roles) for m in g.modules]) for g in r.groups(report)]
    label_w = max((r.text_width(line, FONT) for p in panels for row in p.rows for line in row.label), default=0.0)
    label_w += CELL_PAD
    cell_w = max([MIN_CELL_W, *(r.text_width(_band_text(band), FONT) + CELL_PAD
                                for p in panels for row in p.rows for bands in row.cells for band in bands)])
    panel_w = max([label_w + len(roles) * (cell_w + CELL_GAP), *(_heading_width(p.group) for p in panels)])
    per_line = max(1, int((MAX_WIDTH - 2 * MARGIN + PANEL_GAP) // (panel_w + PANEL_GAP)))
    lines = [panels[i:i + per_line] for i in range(0, len(panels), per_line)]
    width = 2 * MARGIN + min(per_line, len(panels)) * (panel_w + PANEL_GAP) - PANEL_GAP
    header = _header(report, width - 2 * MARGIN)
    width = header.width + 2 * MARGIN
    top = MARGIN + header.height
    height = top + sum(max(p.height for p in line) + PANEL_GAP for line in lines) + MARGIN - PANEL_GAP

    svg = r.svg_root(width, height, FONT)
    header.draw(svg, MARGIN, MARGIN)
    y = top
    for line in lines:
        for i, panel in enumerate(line):
            _draw_panel(svg, panel, roles, MARGIN + i * (panel_w + PANEL_GAP), y, label_w, cell_w)
        y += max(p.height for p in line) + PANEL_GAP
    return r.to_string(svg)


def _row(module: r.Module, group: str, roles: list[Role]) -> _Row:
    """The module's GEMMs of each role, in bands by cell text (in graph order)."""
    cells = []
    for role in roles:
        bands: dict[str, list[Entry]] = {}
        for entry in module.of_role(role):
            bands.setdefault(_cell_text(entry), []).append(entry)
        cells.append(list(bands.values()))
    return _Row(module.fqn, r.wrap(r.module_label(module.fqn, group), LABEL_CHARS), cells)


def _cell_text(entry: Entry) -> str:
    return f"MXFP8 {entry.site.layout.value}" if entry.converted else entry.decision.reason.name


def _band_text(band: list[Entry]) -> str:
    """The cell text of a band's GEMMs (one decision), with their count when several."""
    text = _cell_text(band[0])
    return f"{text} ×{len(band)}" if len(band) > 1 else text


def _counts(group: r.Group) -> str:
    """``30 of 33 in MXFP8``: the counts beside a panel's heading."""
    return f"{sum(e.converted for e in group.entries)} of {len(group.entries)} in MXFP8"


def _heading_width(group: r.Group) -> float:
    return r.text_width(group.name + "  ", FONT + 1) + r.text_width(_counts(group), FONT - 1)


def _baseline(top: float, height: float) -> float:
    """The baseline of a line of text centred in a band from ``top``, ``height`` tall."""
    return top + height / 2 + BASELINE_DROP * FONT


def _header(report: PassReport, width: float) -> r.Header:
    """Title, counts and target, and the legend of colours."""
    note = f"{r.counts_text(report.entries)}; why this target: {report.target_why or 'n/a'}"
    items = [r.LegendItem(label, r.STATUS_COLOURS[key]) for key, label in LEGEND.items()]
    items.append(r.LegendItem("no GEMM of this role; hover a cell for details", r.EMPTY_COLOURS))
    return r.Header.fitted(f"mxfp8 conversion map: {report.graph} graph, target {report.target}", note, items,
                           TITLE_FONT, FONT, width)


def _draw_panel(svg: ET.Element, panel: _Panel, roles: list[Role], x: float, y: float, label_w: float,
                cell_w: float) -> None:
    """The heading, the role columns' titles and the rows, from (x, y), the top-left corner."""
    group = ET.SubElement(svg, "g", attrib={"class": "group", "data-group": panel.group.name})
    heading = r.add_text(group, x, y + FONT, [panel.group.name], FONT + 1, **{"font-weight": "bold"})
    r.add_title(heading, r.counts_text(panel.group.entries))
    r.add_text(group, x + r.text_width(panel.group.name + "  ", FONT + 1), y + FONT, [_counts(panel.group)],
               FONT - 1, fill=r.MUTED_COLOUR)
    y += HEADING_H
    for i, role in enumerate(roles):
        centre = x + label_w + i * (cell_w + CELL_GAP) + cell_w / 2
        r.add_text(group, centre, y + FONT, [role.value], FONT, fill=r.MUTED_COLOUR, **{"text-anchor": "middle"})
    y += COLUMN_HEADER_H
    for row in panel.rows:
        _draw_row(group, row, roles, x, y, label_w, cell_w)
        y += row.height + CELL_GAP


def _draw_row(parent: ET.Element, row: _Row, roles: list[Role], x: float, y: float, label_w: float,
              cell_w: float) -> None:
    """The module's label (its FQN in the hover) and a cell per role; grey ``—`` for none."""
    group = ET.SubElement(parent, "g", attrib={"class": "module", "data-fqn": row.fqn})
    label = r.add_text(group, x, _baseline(y, BAND_H), row.label, FONT)
    r.add_title(label, row.fqn or r.NO_MODULE)
    for i, (role, bands) in enumerate(zip(roles, row.cells)):
        cell_x = x + label_w + i * (cell_w + CELL_GAP)
        cell = ET.SubElement(group, "g", attrib={"class": "cell", "data-role": role.value})
        if not bands:
            fill, stroke, ink = r.EMPTY_COLOURS
            r.add_rect(cell, cell_x, y, cell_w, row.height, fill, stroke, rx="3")
            r.add_text(cell, cell_x + cell_w / 2, _baseline(y, BAND_H), [EMPTY], FONT, fill=ink,
                       **{"text-anchor": "middle"})
            continue
        band_h = row.height / len(bands)
        for j, band in enumerate(bands):
            _draw_band(cell, band, cell_x, y + j * band_h, cell_w, band_h)


def _draw_band(parent: ET.Element, band: list[Entry], x: float, y: float, w: float, h: float) -> None:
    """One slice per GEMM (its id, colour and hover), an outline around them with ticks between
    them at its edges (a line across would cross the text), the band's text over them."""
    fill, stroke, ink = r.STATUS_COLOURS[r.status(band[0])]  # one cell text, one status
    slice_w = w / len(band)
    for k, entry in enumerate(band):
        rect = r.add_rect(parent, x + k * slice_w, y, slice_w, h, fill, "none", rx="3", id=r.gemm_id(entry),
                          **{"class": f"gemm {r.status(entry)}"})
        r.add_title(rect, r.entry_hover(entry))
    r.add_rect(parent, x, y, w, h, "none", stroke, rx="3", **{"pointer-events": "none"})
    for k in range(1, len(band)):
        tick_x = f"{x + k * slice_w:.1f}"
        for y1, y2 in ((y, y + TICK), (y + h - TICK, y + h)):
            ET.SubElement(parent, "line", x1=tick_x, y1=f"{y1:.1f}", x2=tick_x, y2=f"{y2:.1f}", stroke=stroke)
    # the text lets the pointer through to the slices under it, whose hovers say more
    r.add_text(parent, x + w / 2, _baseline(y, h), [_band_text(band)], FONT, fill=ink,
               **{"text-anchor": "middle", "pointer-events": "none"})
