"""benchmarks/plot_training.py: the figures say what they draw (legend, axis labels), draw the data
they were given (the smoothed curve, the held-out points), and the PNG decodes at the size asked
for; the CLI re-renders a logged CSV of benchmarks/results."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import plot_training  # noqa: E402
from plot_training import heldout_figure, loss_figure, save_png, smoothing_window  # noqa: E402

STEPS, EVAL_EVERY = 600, 100


def _log(seeds: tuple[int, ...] = (1, 2), runs: tuple[str, ...] = ("bf16", "mxfp8")) -> list[dict[str, str]]:
    """A log as log.csv reads back (strings): a noisy falling loss, held-out every EVAL_EVERY steps."""
    rng = random.Random(0)
    rows = []
    for seed in seeds:
        for i, run in enumerate(runs):
            for step in range(STEPS):
                loss = 2 + 3.5 * math.exp(-step / 60) + 0.01 * i + rng.uniform(-0.2, 0.2)
                held = str(loss + 0.1) if (step + 1) % EVAL_EVERY == 0 else ""
                rows.append({"run": run, "seed": str(seed), "step": str(step), "train_loss": str(loss),
                             "tokens_per_s": "1000.0", "heldout_loss": held, "params": "245822208",
                             "peak_bytes": "nan"})
    return rows


def _line(fig: Figure, gid: str) -> Line2D:
    (line,) = [line for line in fig.axes[0].lines if line.get_gid() == gid]
    return line


def _legends(fig: Figure) -> tuple[list[str], list[str]]:
    """The texts of loss_figure's two legends: the curves' names, and the key (the axes' own legend)."""
    ax = fig.axes[0]
    (names,) = [a for a in ax.get_children() if isinstance(a, Legend) and a is not ax.get_legend()]
    return [t.get_text() for t in names.get_texts()], [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_figure_names_every_curve_and_its_axes() -> None:
    fig = loss_figure(_log(), title="synthetic")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "step"
    assert ax.get_ylabel() == "loss (nats/byte)"
    assert ax.get_title() == "synthetic"
    names, key = _legends(fig)
    assert names == ["bf16, seed 1", "bf16, seed 2", "mxfp8, seed 1", "mxfp8, seed 2"]  # a column per run
    assert key == ["train loss, centred mean of 15 steps", "train loss, each step", "held-out loss"]


def test_one_seed_is_not_named() -> None:
    fig = loss_figure(_log(seeds=(0,)), title="")
    assert _legends(fig)[0] == ["bf16", "mxfp8"]
    gids = {line.get_gid() for line in fig.axes[0].lines}
    assert gids == {f"{kind}:{run}" for kind in ("raw", "smooth", "heldout") for run in ("bf16", "mxfp8")}


def test_the_bold_line_is_the_centred_mean_of_the_raw_loss_and_the_markers_the_heldout_points() -> None:
    rows = _log()
    fig = loss_figure(rows, title="")
    mine = [r for r in rows if r["run"] == "mxfp8" and r["seed"] == "2"]
    loss = [float(r["train_loss"]) for r in mine]
    raw, smooth, held = (_line(fig, f"{kind}:mxfp8, seed 2") for kind in ("raw", "smooth", "heldout"))
    assert list(raw.get_xdata()) == list(range(STEPS)) and list(raw.get_ydata()) == loss
    # the mean of the 15 steps around each step (600 // 40), the window cut at the ends
    for step in (0, 5, 7, 150, STEPS - 1):
        window = loss[max(0, step - 7):step + 8]
        assert smooth.get_ydata()[step] == pytest.approx(sum(window) / len(window), rel=1e-12)
    assert list(smooth.get_xdata()) == list(range(STEPS))
    assert list(held.get_xdata()) == [99, 199, 299, 399, 499, 599]
    assert list(held.get_ydata()) == [float(r["heldout_loss"]) for r in mine if r["heldout_loss"]]
    assert held.get_linestyle() == "None" and held.get_marker() == "s"  # the second seed's marker


def test_the_window_is_about_a_40th_of_the_run() -> None:
    assert [smoothing_window(n) for n in (4, 79, 80, 600, 2000, 4000)] == [1, 1, 3, 15, 51, 101]
    rows = [r for r in _log() if int(r["step"]) < 100]
    fig = loss_figure(rows, title="")
    assert _legends(fig)[1][0] == "train loss, centred mean of 3 steps"
    loss = [float(r["train_loss"]) for r in rows if r["run"] == "bf16" and r["seed"] == "1"]
    assert _line(fig, "smooth:bf16, seed 1").get_ydata()[50] == pytest.approx(sum(loss[49:52]) / 3, rel=1e-12)
    few = loss_figure([r for r in rows if int(r["step"]) < 4], title="")  # train_moe.py's CPU dry run
    assert _legends(few)[1][0] == "train loss (too few steps to smooth)"
    assert list(_line(few, "smooth:bf16, seed 1").get_ydata()) == loss[:4]


def test_runs_have_their_colours_and_repeats_differ() -> None:
    fig = loss_figure(_log(), title="")
    colour = {gid: _line(fig, gid).get_color() for gid in ("smooth:bf16, seed 1", "smooth:mxfp8, seed 1",
                                                           "smooth:bf16, seed 2")}
    assert to_rgb(colour["smooth:bf16, seed 1"]) == to_rgb("tab:blue")
    assert to_rgb(colour["smooth:mxfp8, seed 1"]) == to_rgb("tab:orange")
    assert to_rgb(colour["smooth:bf16, seed 2"]) != to_rgb("tab:blue")  # a darker blue
    assert _line(fig, "smooth:bf16, seed 2").get_linestyle() != _line(fig, "smooth:bf16, seed 1").get_linestyle()


def test_the_y_axis_leaves_out_only_the_first_steps() -> None:
    rows = _log()
    ax = loss_figure(rows, title="").axes[0]
    bottom, top = ax.get_ylim()
    assert bottom <= min(float(r["train_loss"]) for r in rows)
    assert top >= max(float(r["heldout_loss"]) for r in rows if r["heldout_loss"])
    cut = [int(r["step"]) for r in rows if float(r["train_loss"]) > top]
    assert cut and max(cut) < 25  # only the loss of the first steps runs off the top


def test_the_png_decodes_at_the_size_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    save_png(loss_figure(_log(), title="synthetic"), path)
    image = imread(path)
    assert image.shape[:2] == (605, 1100)  # 5.5 x 10 inches at 110 dpi
    assert image[..., :3].std() > 0.05  # something is drawn


def test_heldout_figure_labels_each_run_with_its_log() -> None:
    fig = heldout_figure({"first": _log(seeds=(0,)), "second": _log(seeds=(0,), runs=("mxfp8",))},
                         title="", from_step=150)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bf16, first", "mxfp8, first", "mxfp8, second"]
    assert ax.get_ylabel() == "held-out loss (nats/byte)"
    line = _line(fig, "heldout:mxfp8, second")
    assert list(line.get_xdata()) == [199, 299, 399, 499, 599]  # from step 150 on
    # the second mxfp8 run is the run's second repeat: its own line style
    assert line.get_linestyle() != _line(fig, "heldout:mxfp8, first").get_linestyle()


def test_the_cli_rerenders_a_logged_csv(tmp_path: Path) -> None:
    # the older format: no seed column, and a run outside COLOURS
    log = BENCHMARKS / "results" / "train_moe_2026-11-24_fast_accum_log.csv"
    out = tmp_path / "loss.png"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "plot_training.py"), str(log), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert imread(out).shape[:2] == (605, 1100)


def test_what_cannot_be_drawn_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        plot_training.main(["a_log.csv", "b_log.csv"])
    assert "only with --heldout" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nothing to plot: the log second has no rows"):
        heldout_figure({"first": _log(seeds=(0,)), "second": []}, title="")
