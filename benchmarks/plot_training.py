"""Loss plots of ``benchmarks/train_moe.py``'s logs, drawn with matplotlib.

A log is a list of rows, one per training step of one run: ``train_moe.train``'s dicts, or its
log.csv read back (the same keys, every value a string). Keys read here: ``run``, ``step``,
``train_loss``, ``heldout_loss`` (empty except at evaluations) and, since 2026-12-04, ``seed``
(older logs hold one seed and have no such column). The loss is ``F.cross_entropy`` over bytes,
so its unit is nats per byte.

- ``loss_figure``: one log; each run's per-step training loss drawn faint, its centred rolling
  mean bold in the same colour, its held-out loss as markers.
- ``heldout_figure``: several logs (runs repeated across sessions); held-out loss only.

Colour tells the run (bf16 blue, mxfp8 orange, ...); a run's repeats (seeds, logs) differ in
shade, line style and marker. matplotlib is imported only when a figure is drawn, so train_moe.py
runs without it (``have_matplotlib``); figures are built on the Agg canvas without pyplot, so no
global figure state is touched.

    python benchmarks/plot_training.py LOG_log.csv                      # writes LOG_loss.png
    python benchmarks/plot_training.py --heldout --from-step 299 A_log.csv B_log.csv --out X.png
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Row = Mapping[str, str | int | float]  # train_moe.train's numbers, or log.csv's strings

LOSS_UNIT = "nats/byte"  # F.cross_entropy (natural log) over byte tokens
FIGSIZE = (10.0, 5.5)  # inches
DPI = 110
COLOURS = {"bf16": "tab:blue", "mxfp8": "tab:orange", "mxfp8_every_gemm": "tab:red", "mxfp8_experts": "tab:green",
           "mxfp8_exact_accum": "tab:purple"}
# runs outside COLOURS (older logs' names, e.g. mxfp8_fast_accum), in order of appearance
SPARE_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
PLOTS_HINT = 'pip install -e ".[plots]"'


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a log.csv, values as strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Centred rolling mean: ``out[i]`` is the mean of ``values[i - window // 2 : i + window // 2 + 1]``,
    the window cut at the ends (so fewer values there). Centred rather than an exponential moving
    average: a causal average lags a falling loss, which in the first hundred steps (5.5 to 2.5
    nats) put the smoothed curve far above every step it smooths."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def smoothing_window(steps: int) -> int:
    """The rolling mean's window for runs of ``steps`` steps: odd (centred on its step), about a
    40th of the run (51 steps of 2000, where the loss varies by ±0.2 nats from step to step); 1,
    no smoothing, under 80 steps."""
    return 2 * (steps // 80) + 1


@dataclass(frozen=True)
class Curve:
    """One run of one seed: its per-step training loss and its held-out evaluations."""

    run: str
    label: str  # the run, and what tells it from the same run's other curves
    repeat: int  # its index among the curves of the same run: picks shade, line style, marker
    steps: list[int]
    train: list[float]
    heldout_steps: list[int]
    heldout: list[float]


def curves(rows: Sequence[Row], source: str | None = None, repeat_from: Mapping[str, int] | None = None) -> list[Curve]:
    """The (run, seed) curves of one log, in order of appearance. Labels name the seed when the
    log holds several, and ``source`` (the log's name) when given; ``repeat_from`` counts the
    curves of each run already drawn from other logs."""
    if not rows:
        raise ValueError(f"nothing to plot: the log{f' {source}' if source else ''} has no rows")
    keys = list(dict.fromkeys((str(r["run"]), str(r.get("seed", ""))) for r in rows))
    several_seeds = len({seed for _, seed in keys}) > 1
    repeats = dict(repeat_from or {})
    out = []
    for run, seed in keys:
        mine = [r for r in rows if str(r["run"]) == run and str(r.get("seed", "")) == seed]
        held = [r for r in mine if r["heldout_loss"] != ""]
        label = ", ".join([run] + ([f"seed {seed}"] if several_seeds else []) + ([source] if source else []))
        out.append(Curve(run, label, repeats.get(run, 0), [int(r["step"]) for r in mine],
                         [float(r["train_loss"]) for r in mine], [int(r["step"]) for r in held],
                         [float(r["heldout_loss"]) for r in held]))
        repeats[run] = repeats.get(run, 0) + 1
    return out


def _colour(curve: Curve, runs: Sequence[str]) -> tuple[float, float, float]:
    """The run's colour, darker for each repeat (RESULTS.md describes repeats as shades)."""
    from matplotlib.colors import to_rgb

    spare = [r for r in dict.fromkeys(runs) if r not in COLOURS]
    base = to_rgb(COLOURS.get(curve.run) or SPARE_COLOURS[spare.index(curve.run) % len(SPARE_COLOURS)])
    dark = 1 - 0.18 * min(curve.repeat, 3)
    return (base[0] * dark, base[1] * dark, base[2] * dark)


def _axes(title: str, ylabel: str) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no ticks at 0.5 in a short run
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, ax


def loss_figure(rows: Sequence[Row], *, title: str) -> Figure:
    """Every run of the log ``rows``: the per-step training loss faint (gid ``raw:<label>``), its
    ``rolling_mean`` over the longest run's ``smoothing_window`` bold in the same colour (gid
    ``smooth:<label>``), the held-out loss as markers at the evaluated steps (gid
    ``heldout:<label>``). One legend names the curves, a column per run (its line and marker); a
    second says what faint, bold and markers are. The y axis ends a little above the highest bold
    line or marker, so the first few steps' faint line runs off the top."""
    from matplotlib.lines import Line2D

    fig, ax = _axes(title, f"loss ({LOSS_UNIT})")
    drawn = curves(rows)
    runs = list(dict.fromkeys(c.run for c in drawn))
    window = smoothing_window(max(len(c.steps) for c in drawn))
    for c in drawn:
        ax.plot(c.steps, c.train, color=_colour(c, runs), linewidth=0.5, alpha=0.2, gid=f"raw:{c.label}")
    entries, top = [], float("-inf")
    for c in drawn:  # above every faint line, so no run's noise covers another's curve
        colour, first = _colour(c, runs), c.run == runs[0]
        # the log's first run (bf16 where it has one) wide and filled, the others narrower and
        # hollow on top of it: where they coincide, both show
        smoothed = rolling_mean(c.train, window)
        top = max(top, *smoothed, *c.heldout)
        (smooth,) = ax.plot(c.steps, smoothed, color=colour, linewidth=2.8 if first else 1.6,
                            linestyle=LINESTYLES[c.repeat % len(LINESTYLES)], gid=f"smooth:{c.label}")
        (held,) = ax.plot(c.heldout_steps, c.heldout, linestyle="none", marker=MARKERS[c.repeat % len(MARKERS)],
                          markersize=6, color=colour, markerfacecolor=colour if first else "none",
                          markeredgecolor="white" if first else colour, markeredgewidth=0.7 if first else 1.4,
                          gid=f"heldout:{c.label}", zorder=3)
        entries.append((runs.index(c.run), c.repeat, (smooth, held), c.label))
    entries.sort(key=lambda e: e[:2])  # column-major: each run's curves in one column
    names = ax.legend([e[2] for e in entries], [e[3] for e in entries], loc="upper right", ncols=len(runs),
                      fontsize="small", framealpha=0.9, handlelength=3)
    ax.add_artist(names)
    grey = "0.35"
    ax.legend([Line2D([], [], color=grey, linewidth=2), Line2D([], [], color=grey, linewidth=0.5, alpha=0.5),
               Line2D([], [], color=grey, linestyle="none", marker="o", markeredgecolor="white")],
              [f"train loss, centred mean of {window} steps" if window > 1 else "train loss (too few steps to smooth)",
               "train loss, each step", "held-out loss"],
              loc="lower left", fontsize="small", framealpha=0.9)  # a falling loss leaves that corner empty
    ax.margins(x=0.01)  # the last evaluation's marker sits on the last step
    # the first steps' loss (ln 256 = 5.5 nats at step 0) would take most of the height from the
    # part of the curves that is compared; it runs off the top instead
    bottom = ax.get_ylim()[0]
    ax.set_ylim(bottom, top + 0.08 * (top - bottom))
    return fig


def heldout_figure(logs: Mapping[str, Sequence[Row]], *, title: str, from_step: int = 0) -> Figure:
    """The held-out loss of every run of every log (name -> rows) from ``from_step`` on, one line
    with markers per run (gid ``heldout:<label>``), labelled with its run, seed and log name."""
    fig, ax = _axes(title, f"held-out loss ({LOSS_UNIT})")
    drawn: list[Curve] = []
    for name, rows in logs.items():
        drawn += curves(rows, source=name, repeat_from=Counter(c.run for c in drawn))
    runs = [c.run for c in drawn]
    for c in drawn:
        kept = [(s, v) for s, v in zip(c.heldout_steps, c.heldout) if s >= from_step]
        ax.plot([s for s, _ in kept], [v for _, v in kept], color=_colour(c, runs),
                linestyle=LINESTYLES[c.repeat % len(LINESTYLES)], marker=MARKERS[c.repeat % len(MARKERS)],
                markersize=4, linewidth=1.5, label=c.label, gid=f"heldout:{c.label}")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG of FIGSIZE at DPI (1100 x 605 pixels)."""
    fig.savefig(path, dpi=DPI)


def _params(rows: Sequence[Row]) -> str:
    return f"{int(rows[0]['params']) / 1e6:.1f}M-parameter MoE" if "params" in rows[0] else "MoE"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Re-render train_moe.py's loss plot from its log.csv.")
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOG.csv")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG (default for one log: its name with log.csv replaced by loss.png)")
    parser.add_argument("--heldout", action="store_true",
                        help="draw only the held-out loss, of every run of every log given")
    parser.add_argument("--from-step", type=int, default=0, help="with --heldout: the first step drawn")
    args = parser.parse_args(argv)
    if not have_matplotlib():
        parser.error(f"plotting needs matplotlib: {PLOTS_HINT}")
    if args.heldout:
        if args.out is None:
            parser.error("--heldout needs --out")
        logs = {path.name.removesuffix(".csv").removesuffix("_log"): read_log(path) for path in args.logs}
        first = next(iter(logs.values()))
        fig = heldout_figure(logs, title=f"train_moe.py held-out loss, {_params(first)}, from step {args.from_step}",
                             from_step=args.from_step)
    else:
        if len(args.logs) > 1:
            parser.error("several logs are drawn together only with --heldout")
        path = args.logs[0]
        if args.out is None and not path.name.endswith("log.csv"):
            parser.error(f"{path.name} does not end in log.csv: give --out")
        rows = read_log(path)
        fig = loss_figure(rows, title=f"{path.name}: {_params(rows)}, {len({r['step'] for r in rows})} steps")
    out = args.out or args.logs[0].with_name(args.logs[0].name.removesuffix("log.csv") + "loss.png")
    save_png(fig, out)
    print(out)


if __name__ == "__main__":
    main()
