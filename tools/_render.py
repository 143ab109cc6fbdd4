"""What the dump's two pictures share: the GEMMs grouped by layer in execution order, the
colours of a decision, text sizing and wrapping, and SVG building blocks.

The pictures are ``_render_map.conversion_map_svg`` (every GEMM of a graph as one cell of a
module x role table) and ``_render_detail.region_svgs`` (the rewrite of each GEMM, one
picture per layer). Both order modules by execution: a report's entries are in graph order
(``find_gemms`` walks the graph, and the passes keep that order), and a graph's node order is
its execution order, so the forward GEMMs of a joint graph come first, in the order the
model's ``forward`` runs them.

Text is never cut: labels are sized to their text or wrapped at ``wrap``'s break points; the
widths assume a monospace font (``CHAR_W`` of its size per character, as DejaVu Sans Mono).
Graph-internal node names are shown only in ``<title>`` elements (the hover text).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence

from mxfp8_compile.passes.report import Entry, PassReport, Role, SkipReason, format_bytes

SVG_NS = "http://www.w3.org/2000/svg"
FONT_FAMILY = "DejaVu Sans Mono, Menlo, Consolas, monospace"
CHAR_W = 0.6  # a monospace glyph's advance, in units of the font size
LINE_H = 1.25  # a text line's height, in units of the font size
ASCENT = 0.85  # a line's baseline under its top, in units of the font size
TEXT_COLOUR = "#222222"
MUTED_COLOUR = "#666666"
# A legend item, in units of the font size: a swatch, a gap, the label, a gap to the next
SWATCH_W, SWATCH_GAP, ITEM_GAP = 2.0, 0.6, 2.0
LEGEND_LINE_GAP = 4.0  # px between legend lines
HEADER_GAP = 8.0  # px under the legend

ROLES = (Role.FORWARD, Role.DGRAD, Role.WGRAD)  # the order of columns and of detail rows
NO_MODULE = "(no module)"  # the heading of GEMMs traced outside any module
NO_MODULE_STEM = "no_module"  # ... and its file stem

# A decision's status: converted, kept by a choice the config makes (amber: change the config
# to convert it), or kept because the MX path cannot take the GEMM (red).
CONVERTED, POLICY, CANNOT = "converted", "policy", "cannot"
POLICY_REASONS = frozenset({
    SkipReason.ROLE_DISABLED, SkipReason.DENSE_DISABLED, SkipReason.KEEP_BF16, SkipReason.FQN_EXCLUDED,
    SkipReason.FQN_NOT_INCLUDED, SkipReason.TOO_SMALL, SkipReason.A2A_WGRAD_DEQUANT,
    SkipReason.A2A_BF16_FOR_WGRAD,
})
# (fill, stroke, text) per status; EMPTY for a role without a GEMM.
STATUS_COLOURS = {
    CONVERTED: ("#c7f0d2", "#2e8540", "#1d5c2c"),
    POLICY: ("#ffe8b0", "#c98a00", "#7a5200"),
    CANNOT: ("#f8d7da", "#b02a37", "#7d1a24"),
}
EMPTY_COLOURS = ("#f2f2f2", "#d0d0d0", "#9a9a9a")
EDGE_COLOUR = "#555555"

_DIGITS = re.compile(r"\d+")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def status(entry: Entry) -> str:
    """``CONVERTED``, ``POLICY`` or ``CANNOT``."""
    if entry.converted:
        return CONVERTED
    return POLICY if entry.decision.reason in POLICY_REASONS else CANNOT


def gemm_id(entry: Entry) -> str:
    """The SVG element id of a GEMM: ``gemm-`` and its label, made a valid XML name."""
    return "gemm-" + _ID_UNSAFE.sub("-", entry.site.label)


# --------------------------------------------------------------------------------------------
# GEMMs by layer and module, in execution order.
# --------------------------------------------------------------------------------------------


def layer_group(fqn: str) -> str:
    """The layer a module belongs to: its FQN up to and including the first numeric component
    (``layers.0`` of ``layers.0.attn.q_proj``, ``model.layers.3`` of ``model.layers.3.mlp``),
    else its top-level name (``lm_head``); ``NO_MODULE`` for the empty FQN."""
    if not fqn:
        return NO_MODULE
    parts = fqn.split(".")
    for i, part in enumerate(parts):
        if _DIGITS.fullmatch(part):
            return ".".join(parts[: i + 1])
    return parts[0]


def group_stem(group: str) -> str:
    """A file stem for a layer group (its name; ``NO_MODULE_STEM`` for ``NO_MODULE``)."""
    return NO_MODULE_STEM if group == NO_MODULE else group


def module_label(fqn: str, group: str) -> str:
    """A module's name under its group's heading: its FQN without the group prefix, or the
    whole FQN when the module is the group (``lm_head``)."""
    relative = fqn.removeprefix(group + ".")
    return relative if relative != fqn else (fqn or NO_MODULE)


@dataclasses.dataclass(frozen=True)
class Module:
    """One module's GEMMs, in graph order."""

    fqn: str
    entries: tuple[Entry, ...]

    def of_role(self, role: Role) -> list[Entry]:
        return [e for e in self.entries if e.site.role is role]


@dataclasses.dataclass(frozen=True)
class Group:
    """A layer (or a top-level module) and its modules in execution order."""

    name: str
    modules: tuple[Module, ...]

    @property
    def entries(self) -> list[Entry]:
        return [e for m in self.modules for e in m.entries]


def groups(report: PassReport) -> list[Group]:
    """The report's GEMMs by layer group and module, each in order of its first GEMM in the
    graph (execution order: forward GEMMs come first)."""
    by_fqn: dict[str, list[Entry]] = {}
    for entry in report.entries:
        by_fqn.setdefault(entry.site.fqn, []).append(entry)
    by_group: dict[str, list[Module]] = {}
    for fqn, entries in by_fqn.items():
        by_group.setdefault(layer_group(fqn), []).append(Module(fqn, tuple(entries)))
    return [Group(name, tuple(modules)) for name, modules in by_group.items()]


def shapes_text(entry: Entry) -> str:
    """``(256,128)x(8,128,128) bfloat16``: the operands A and B as the GEMM sees them."""
    a, b = entry.site.shapes
    return f"({','.join(a)})x({','.join(b)}) {entry.site.dtype}"


def decision_text(entry: Entry) -> str:
    """``converted to MXFP8 (operands 64.00 KiB -> 33.00 KiB)`` or the reason, name and sentence."""
    if entry.converted:
        site = entry.site
        if site.bytes_before is None:
            return "converted to MXFP8"
        return f"converted to MXFP8 (operands {format_bytes(site.bytes_before)} -> {format_bytes(site.bytes_after)})"
    return f"kept in high precision, {entry.decision.reason.name}: {entry.decision}"


def entry_hover(entry: Entry) -> str:
    """The hover text of a GEMM: module, role, layout, shapes, decision and graph node."""
    site = entry.site
    return "\n".join([
        f"{site.fqn or NO_MODULE}: {site.role.value} {site.layout.value}",
        f"{shapes_text(entry)}, contraction {site.contraction}",
        decision_text(entry),
        f"node {site.label} ({site.op})",
    ])


def counts_text(entries: Sequence[Entry]) -> str:
    """``30 of 33 GEMMs converted to MXFP8, 3 kept``."""
    converted = sum(e.converted for e in entries)
    return f"{converted} of {len(entries)} GEMMs converted to MXFP8, {len(entries) - converted} kept"


# --------------------------------------------------------------------------------------------
# Text and SVG.
# --------------------------------------------------------------------------------------------

BREAK_AFTER = " ._,)"  # wrap after these; a word longer than the line breaks anywhere


def text_width(text: str, size: float) -> float:
    return len(text) * size * CHAR_W


def wrap(text: str, width: int) -> list[str]:
    """``text`` as lines of at most ``width`` characters that concatenate back to ``text``
    (nothing dropped, nothing added): each broken after the last ``BREAK_AFTER`` character
    that fits (``_breaks_after``), or at ``width`` when none does in the line's second half."""
    lines: list[str] = []
    while len(text) > width:
        cut = max((i + 1 for i in range(width) if _breaks_after(text, i)), default=0)
        if cut <= width // 2:
            cut = width
        lines.append(text[:cut])
        text = text[cut:]
    return lines + [text]


def _breaks_after(text: str, i: int) -> bool:
    """Whether a line may end after ``text[i]``: a ``BREAK_AFTER`` character, but not the point
    of a number (``64.00``)."""
    if text[i] not in BREAK_AFTER:
        return False
    return not (text[i] == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit())


def svg_root(width: float, height: float, size: float) -> ET.Element:
    """An ``<svg>`` of that size on white, text ``size`` px in ``FONT_FAMILY``, with an arrow
    marker (``url(#arrow)``) for edges."""
    svg = ET.Element("svg", xmlns=SVG_NS, width=f"{width:.0f}", height=f"{height:.0f}",
                     viewBox=f"0 0 {width:.0f} {height:.0f}",
                     attrib={"font-family": FONT_FAMILY, "font-size": f"{size:g}", "fill": TEXT_COLOUR})
    defs = ET.SubElement(svg, "defs")
    marker = ET.SubElement(defs, "marker", id="arrow", viewBox="0 0 8 8", refX="8", refY="4",
                           markerWidth="6", markerHeight="6", orient="auto")
    ET.SubElement(marker, "path", d="M0,0 L8,4 L0,8 z", fill=EDGE_COLOUR)
    ET.SubElement(svg, "rect", width="100%", height="100%", fill="white")
    return svg


def add_title(parent: ET.Element, text: str) -> None:
    """Hover text for ``parent`` (an SVG ``<title>`` child)."""
    ET.SubElement(parent, "title").text = text


def add_text(
    parent: ET.Element, x: float, y: float, lines: Iterable[str], size: float, **attrib: str
) -> ET.Element:
    """A ``<text>`` of one ``<tspan>`` per line, the first baseline at ``y``; ``attrib``
    (``fill``, ``font-weight``, ``text-anchor``...) applies to all of it."""
    text = ET.SubElement(parent, "text", x=f"{x:.1f}", y=f"{y:.1f}", attrib={"font-size": f"{size:g}", **attrib})
    for i, line in enumerate(lines):
        span = ET.SubElement(text, "tspan", x=f"{x:.1f}", dy="0" if i == 0 else f"{size * LINE_H:.1f}")
        span.text = line
    return text


def add_rect(parent: ET.Element, x: float, y: float, w: float, h: float, fill: str, stroke: str,
             **attrib: str) -> ET.Element:
    """A ``<rect>``; ``attrib`` adds ``rx``, ``id``, ``class``..."""
    return ET.SubElement(parent, "rect", x=f"{x:.1f}", y=f"{y:.1f}", width=f"{w:.1f}", height=f"{h:.1f}",
                         fill=fill, stroke=stroke, attrib=attrib)


@dataclasses.dataclass(frozen=True)
class LegendItem:
    """A box of ``colours`` (fill, stroke, text), or a line sample when None, and its label."""

    label: str
    colours: tuple[str, str, str] | None = None
    dash: str = ""

    def width(self, size: float) -> float:
        return (SWATCH_W + SWATCH_GAP + ITEM_GAP) * size + text_width(self.label, size)


def legend_lines(items: Sequence[LegendItem], size: float, width: float) -> list[list[LegendItem]]:
    """``items`` in lines no wider than ``width`` (an item wider than that gets a line alone)."""
    lines: list[list[LegendItem]] = [[]]
    used = 0.0
    for item in items:
        if lines[-1] and used + item.width(size) > width:
            lines.append([])
            used = 0.0
        lines[-1].append(item)
        used += item.width(size)
    return lines


def draw_legend(parent: ET.Element, x: float, y: float, lines: list[list[LegendItem]], size: float) -> None:
    """The legend's lines from (x, y), the top of the first."""
    for line in lines:
        left = x
        for item in line:
            if item.colours is None:
                middle = f"{y + size / 2:.1f}"
                ET.SubElement(parent, "line", x1=f"{left:.1f}", y1=middle, x2=f"{left + SWATCH_W * size:.1f}",
                              y2=middle, stroke=EDGE_COLOUR, attrib={"stroke-dasharray": item.dash})
            else:
                rect = add_rect(parent, left, y, SWATCH_W * size, size, item.colours[0], item.colours[1], rx="2")
                if item.dash:
                    rect.set("stroke-dasharray", item.dash)
            add_text(parent, left + (SWATCH_W + SWATCH_GAP) * size, y + ASCENT * size, [item.label], size)
            left += item.width(size)
        y += size * LINE_H + LEGEND_LINE_GAP


@dataclasses.dataclass(frozen=True)
class Header:
    """A picture's title, the lines under it and its legend, from the top-left margin."""

    title: str
    notes: list[str]
    legend: list[list[LegendItem]]
    title_size: float
    size: float
    width: float  # at least the title's

    @classmethod
    def fitted(cls, title: str, note: str, items: Sequence[LegendItem], title_size: float, size: float,
               width: float) -> Header:
        """The note wrapped and the legend broken into lines to fit ``width``, or the title's
        width when that is wider (the title is one line)."""
        width = max(width, text_width(title, title_size))
        chars = int(width / (size * CHAR_W)) - 1  # the font may run a little wider than CHAR_W
        return cls(title, wrap(note, chars), legend_lines(items, size, width), title_size, size, width)

    @property
    def height(self) -> float:
        text = (self.title_size + len(self.notes) * self.size) * LINE_H
        return text + LEGEND_LINE_GAP + len(self.legend) * (self.size * LINE_H + LEGEND_LINE_GAP) + HEADER_GAP

    def draw(self, svg: ET.Element, x: float, y: float) -> None:
        """At (x, y), the top-left corner; ``height`` px tall."""
        add_text(svg, x, y + self.title_size, [self.title], self.title_size, **{"font-weight": "bold"})
        y += self.title_size * LINE_H
        add_text(svg, x, y + self.size, self.notes, self.size, fill=MUTED_COLOUR)
        draw_legend(svg, x, y + len(self.notes) * self.size * LINE_H + LEGEND_LINE_GAP, self.legend, self.size)


def to_string(svg: ET.Element) -> str:
    """The SVG, indented but for the inside of ``<text>`` elements: there whitespace is text."""
    ET.indent(svg)
    for text in svg.iter("text"):
        text.text = None  # add_text puts every line in a tspan
        for child in text:
            child.tail = None
    return ET.tostring(svg, encoding="unicode") + "\n"
