"""The report's figures, drawn without pyplot's global state (safe in a training job).

Every figure of a sweep is at least MIN_SIZE inches at DPI, uses a linear axis (each mean is
written next to its point, so it can be read off), keeps legends outside the axes, and puts
each data set in its own panel: MAEs of two data sets are in different units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

# report.Group, the report's unit of comparison. Not imported, even for type checking:
# report.py imports this module, and record.py (during training) imports it for the
# TensorBoard image; no module here reaches back up to the report (tests/test_layout.py).
Group = Any

DPI = 100
MIN_SIZE = (8.0, 4.5)  # inches: 800 x 450 px at DPI
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Points drawn in one predicted-vs-true panel: more look the same, and a million take seconds.
MAX_POINTS = 20_000


def range_text(lo: float | None, hi: float | None) -> str:
    """(0, 1), [0, ∞), (-∞, ∞): closed where a relu reaches its bound, open elsewhere."""
    left = "(-∞" if lo is None else f"{'[' if lo == 0 and hi is None else '('}{lo:g}"
    return f"{left}, {'∞' if hi is None else f'{hi:g}'})"


def units(unit: str) -> str:
    return f" ({unit})" if unit else ""


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(max(width, MIN_SIZE[0]), max(height, MIN_SIZE[1])), layout="constrained")


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})


def figure_rgb(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a figure, without pyplot's global state."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# -- ordering and colours -------------------------------------------------------------------------
def settings_order(groups: Sequence[Group], drop: Sequence[str] = ()) -> list[tuple]:
    """Non-head settings (less those in drop) in reading order: unscaled targets, standard,
    then the rest as swept."""
    rank = {"none": 0, "standard": 1}
    first: dict[tuple, int] = {}
    for g in sorted(groups, key=lambda g: g.order):
        first.setdefault(g.rest_without(drop), g.order)
    return sorted(first, key=lambda rest: ([rank.get(v, 2) for _, v in rest], first[rest]))


def datasets(groups: Sequence[Group]) -> list[str]:
    return list(dict.fromkeys(g.target.dataset for g in sorted(groups, key=lambda g: g.order)))


def heads_of(groups: Sequence[Group]) -> list[str]:
    """Heads in sweep order."""
    return list(dict.fromkeys(g.head for g in sorted(groups, key=lambda g: g.order)))


def head_colors(groups: Sequence[Group]) -> dict[str, str]:
    return {h: f"C{i % 10}" for i, h in enumerate(heads_of(groups))}


def mae_label(target, prefix: str = "MAE") -> str:
    """MAE ($1000s), or "MAE of progression" for a target without a unit."""
    return f"{prefix} ({target.unit})" if target.unit else f"{prefix} of {target.name}"


def scaling_text(scaling: str) -> str:
    return "unscaled" if scaling == "none" else scaling


def setting_text(rest: tuple[tuple[str, str], ...]) -> str:
    """The wording of settings in tables, verdicts and figures alike:
    ("scaling", "none"), ("lr", "0.01") -> "unscaled targets, lr=0.01"."""
    return ", ".join(
        f"{scaling_text(v)} targets" if k == "scaling" else v if k == "data" else f"{k}={v}"
        for k, v in rest
    )


# -- test MAE per head ----------------------------------------------------------------------------
def plot_mae_by_head(groups: list[Group], path: Path) -> None:
    """Test MAE per head, a panel per data set: every run as a faint dot, the mean with its 95%
    CI as a bar, and the mean written next to it."""
    names = datasets(groups)
    rests = settings_order(groups, drop=("data",))
    heads = heads_of(groups)
    fig = new_figure(len(names) * (1.3 * len(heads) * max(1, len(rests)) ** 0.5 + 2.5), 4.5)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    width = 0.8 / len(rests)
    rng = np.random.default_rng(0)
    single = all(g.estimate("test/mae").n < 2 for g in groups)
    for ax, name in zip(axes, names, strict=True):
        mine = [g for g in groups if g.target.dataset == name]
        shown = [h for h in heads if any(g.head == h for g in mine)]
        top = 0.0
        for k, rest in enumerate(rests):
            color = f"C{k % 10}"
            for g in (g for g in mine if g.rest_without(("data",)) == rest):
                x = shown.index(g.head) - 0.4 + width * (k + 0.5)
                vals = list(g.by_run("test/mae").values())
                ax.scatter(
                    x + rng.uniform(-width / 4, width / 4, len(vals)),
                    vals,
                    s=8,
                    color=color,
                    alpha=0.3,
                    linewidths=0,
                )
                e = g.estimate("test/mae")
                ax.errorbar(
                    x,
                    e.mean,
                    yerr=e.half if e.has_ci else None,
                    fmt="o",
                    color=color,
                    capsize=4,
                    ms=5,
                )
                ax.annotate(
                    f"{e.mean:.2f}",
                    (x, e.mean),
                    xytext=(7, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8,
                )
                top = max(top, e.mean + (e.half if e.has_ci else 0), *vals)
        target = mine[0].target
        ax.set_xticks(range(len(shown)), shown)
        ax.set_xlim(-0.6, len(shown) - 0.4)
        ax.set_ylim(0, top * 1.1 or 1)
        ax.set_xlabel("output head")
        ax.set_ylabel(mae_label(target, "test MAE"))
        if len(names) > 1:
            ax.set_title(f"{name}: {target.name}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if rests != [()]:
        handles = [
            axes[0].errorbar([], [], yerr=[], fmt="o", color=f"C{k % 10}", capsize=4, ms=5)
            for k in range(len(rests))
        ]
        fig.legend(handles, [setting_text(r) for r in rests], loc="outside right center")
    note = " (one run per head: no CI)" if single else ""
    fig.suptitle(f"Test MAE per head: runs (dots), mean and 95% CI (bars){note}", fontsize=11)
    save(fig, path)


# -- predictions against the truth ----------------------------------------------------------------
def draw_pred_vs_true(ax, y_true: np.ndarray, y_pred: np.ndarray, title: str, color="C0") -> None:
    """Predictions of one or more runs (rows of y_pred) against the true targets."""
    y_pred = np.atleast_2d(y_pred)
    x = np.broadcast_to(y_true, y_pred.shape)  # one test set for all runs, or one per run
    every = math.ceil(y_pred.size / MAX_POINTS)  # evenly spaced rows, the same for each run
    x, y_pred = x[:, ::every], y_pred[:, ::every]
    ax.scatter(
        x.ravel(),
        y_pred.ravel(),
        s=4,
        alpha=max(0.05, 1 / len(y_pred) ** 0.5),
        color=color,
        linewidths=0,
    )
    lo, hi = min(y_true.min(), 0.0), y_true.max()
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
    ax.set_title(title, fontsize=9)


def pred_vs_true_figure(y_true, y_pred, title: str, target: str = "", unit: str = "") -> Figure:
    """One job's test predictions; record.py logs it to TensorBoard's Images tab, once per
    job. Fixed margins: constrained layout would double the drawing time (0.17 s against 0.09 s
    a figure), which a sweep of many jobs pays once per job."""
    fig = Figure(figsize=(4.2, 3.8))
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.13, top=0.92)
    fill_pred_vs_true(fig.subplots(), y_true, y_pred, title, target, unit)
    return fig


def fill_pred_vs_true(ax, y_true, y_pred, title: str, target: str, unit: str) -> None:
    draw_pred_vs_true(ax, np.asarray(y_true), np.asarray(y_pred), title)
    # At its default height, not moved clear of the axis decorations above the axes (this
    # figure has none): matplotlib's search for them is a tenth of the drawing time.
    ax.set_title(title, fontsize=9, y=1.0)
    ax.set_xlabel(f"true {target or 'target'}{units(unit)}")
    ax.set_ylabel("predicted")


_PRED_VS_TRUE: list[Figure] = []  # this process's, drawn again for each job (pred_vs_true_rgb)


def pred_vs_true_rgb(y_true, y_pred, title: str, target: str = "", unit: str = "") -> np.ndarray:
    """pred_vs_true_figure's pixels, drawn on one figure per process that is emptied and filled
    again for each job: its axes and tick marks are made once (a tick costs 2 ms to make), and
    an image takes 65 ms instead of 100. The same pixels as a new figure's
    (tests/test_tensorboard.py)."""
    if not _PRED_VS_TRUE:
        _PRED_VS_TRUE.append(pred_vs_true_figure(y_true, y_pred, title, target, unit))
        return figure_rgb(_PRED_VS_TRUE[0])
    fig = _PRED_VS_TRUE[0]
    ax = fig.axes[0]
    for artist in [*ax.collections, *ax.lines]:
        artist.remove()
    ax.dataLim.set_points(Bbox.null().get_points())  # the limits of a new axes: none yet
    ax.ignore_existing_data_limits = True
    fill_pred_vs_true(ax, y_true, y_pred, title, target, unit)
    return figure_rgb(fig)


def plot_pred_vs_true(groups: list[Group], path: Path, max_runs: int = 20) -> None:
    """One panel per head (rows: the other settings); a flat line is a head at its bound."""
    heads = heads_of(groups)
    rests = settings_order(groups)
    colors = head_colors(groups)
    one_data = len(datasets(groups)) == 1
    fig = new_figure(2.5 * len(heads) + 1.0, 2.5 * len(rests) + 1.0)
    share = True if one_data else "row"  # two data sets never share an axis
    axes = fig.subplots(len(rests), len(heads), sharex=share, sharey=share, squeeze=False)
    for g in groups:
        ax = axes[rests.index(g.rest), heads.index(g.head)]
        runs = g.runs[:max_runs]  # enough to show the pattern, few enough to draw quickly
        title = f"{g.label}\nMAE {g.estimate('test/mae').mean:.2f}"
        y_true, y_pred = (np.stack([getattr(r, a) for r in runs]) for a in ("y_true", "y_pred"))
        draw_pred_vs_true(ax, y_true, y_pred, title, colors[g.head])
        pin = g.pinned()
        if pin.share >= 0.2:
            ax.text(
                0.04,
                0.96,
                f"{pin.share:.0%} at {pin.value:.2f}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
        if not one_data or ax in axes[-1]:
            ax.set_xlabel(f"true {g.target.name}{units(g.target.unit)}", fontsize=9)
    for ax in axes.ravel():
        if not ax.has_data():
            ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted")
    noun = groups[0].target.noun if one_data else "value"
    fig.suptitle(f"Test predictions vs true {noun}s (dashed: perfect)", fontsize=11)
    save(fig, path)


# -- learning curves ------------------------------------------------------------------------------
def plot_curves(groups: list[Group], path: Path) -> None:
    """MAE per epoch, mean over runs with a ±1 std band: a panel per metric and setting.
    Heads differ in colour, line style, marker and width, so identical curves stay visible,
    and the legend (outside the axes) says which heads overlap exactly."""
    metrics = [
        m for m in ("train/mae", "val/mae") if any(r.curves.get(m) for g in groups for r in g.runs)
    ]
    rests = settings_order(groups)
    grid = [(m, rest) for m in metrics for rest in rests]
    rows, cols = (1, len(metrics)) if len(rests) == 1 else (len(metrics), len(rests))
    colors = head_colors(groups)
    rank = {h: i for i, h in enumerate(colors)}
    one_data = len(datasets(groups)) == 1
    fig = new_figure(3.6 * cols + 2.2, 3.0 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=one_data).ravel()
    drawn: dict[str, list[np.ndarray | None]] = {h: [] for h in colors}  # per panel
    spans = []  # per panel: the y range its curves cover
    handles = {}
    for ax, (metric, rest) in zip(axes, grid, strict=True):
        means = {}
        for g in sorted((g for g in groups if g.rest == rest), key=lambda g: rank[g.head]):
            curves = [r.curves[metric] for r in g.runs if r.curves.get(metric)]
            if not curves:
                continue
            by_epoch = [[c[e] for c in curves if len(c) > e] for e in range(max(map(len, curves)))]
            mean = np.array([np.mean(v) for v in by_epoch])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in by_epoch])
            epochs = np.arange(1, len(mean) + 1)
            i, color = rank[g.head], colors[g.head]
            (line,) = ax.plot(
                epochs,
                mean,
                color=color,
                ls=STYLES[i % len(STYLES)],
                marker=MARKERS[i % len(MARKERS)],
                ms=max(3.0, 8.0 - 1.2 * i),
                lw=max(1.0, 3.2 - 0.6 * i),  # drawn first = widest: an exact overlap shows
                zorder=2 + i,
            )
            handles.setdefault(g.head, line)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, lw=0)
            means[g.head] = mean
        for h in colors:
            drawn[h].append(means.get(h))
        ys = np.concatenate(list(means.values())) if means else np.zeros(1)
        spans.append(float(ys.max() - ys.min()) or 1.0)
        setting = f" ({setting_text(rest)})" if rest else ""
        ax.set_title(metric + setting, fontsize=9)
        ax.grid(alpha=0.3)
        target = next(g.target for g in groups if g.rest == rest)
        ax.set_ylabel(mae_label(target), fontsize=9)
    for ax in axes[-cols:]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    labels = [_curve_label(h, drawn, spans, list(handles)) for h in handles]
    fig.legend(list(handles.values()), labels, loc="outside right center", title="head")
    fig.suptitle("MAE per epoch: mean over runs, band ±1 std", fontsize=11)
    save(fig, path)


def _curve_label(head: str, drawn: dict[str, list], spans: list[float], order: list[str]) -> str:
    """head, or "tanh (overlaps sigmoid)" when its mean curve lies on another's in every panel
    (within 0.5% of the panel's range: one line hides the other)."""
    for other in order[: order.index(head)]:
        pairs = [
            (a, b, span)
            for a, b, span in zip(drawn[head], drawn[other], spans, strict=True)
            if a is not None
        ]
        if pairs and all(
            b is not None and a.shape == b.shape and np.abs(a - b).max() <= 0.005 * span
            for a, b, span in pairs
        ):
            return f"{head} (overlaps {other})"
    return head


# -- the answer in one figure ---------------------------------------------------------------------
def plot_answer(groups: list[Group], path: Path, max_runs: int = 5) -> None:
    """Each head's output range (band, mapped back into target units when the targets were
    scaled) and its test predictions (dots) against the histogram of the training targets:
    a band that misses the histogram is a head that cannot output the targets."""
    panels = []  # (data set, scaling): one panel each, data sets in rows
    for name in datasets(groups):
        mine = [g for g in groups if g.target.dataset == name]
        for rest in settings_order(mine, drop=tuple(k for k, _ in mine[0].rest if k != "scaling")):
            panels.append((name, rest))
    rows = datasets(groups)
    cols = max(sum(p[0] == r for p in panels) for r in rows)
    colors = head_colors(groups)
    heads = list(colors)
    fig = new_figure(5.2 * cols + 0.6, (0.55 * len(heads) + 1.9) * len(rows) + 0.8)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    used = set()
    for name in rows:
        r = rows.index(name)
        for c, (_, rest) in enumerate(p for p in panels if p[0] == name):
            used.add((r, c))
            mine = [g for g in groups if g.target.dataset == name and g.scaling_rest() == rest]
            _answer_panel(axes[r, c], mine, heads, colors, max_runs)
    for r, c in np.ndindex(axes.shape):
        if (r, c) not in used:
            axes[r, c].set_axis_off()
    fig.suptitle(
        "Each head's output range (band) and test predictions (dots) vs the training targets "
        "(grey)",
        fontsize=11,
    )
    save(fig, path)


def _answer_panel(ax, groups: list[Group], heads: list[str], colors, max_runs: int) -> None:
    first = {}  # head -> its first group here (other settings such as lr: the first one)
    for g in sorted(groups, key=lambda g: g.order):
        first.setdefault(g.head, g)
    lanes = [h for h in heads if h in first][::-1]  # the sweep's first head on top
    run0 = first[lanes[0]].runs[0]
    target = first[lanes[0]].target
    if run0.train:
        hist = run0.train["histogram"]
        counts, edges = np.asarray(hist["counts"], float), np.asarray(hist["edges"], float)
        what, mean = f"training targets ({run0.train['rows']} rows)", run0.train["mean"]
    else:  # a job from before train_targets was recorded: its test targets instead
        counts, edges = np.histogram(run0.y_true, bins=30)
        what, mean = "test targets (training targets not recorded)", float(run0.y_true.mean())
    ranges, preds = {}, {}
    for h in lanes:
        g = first[h]
        ranges[h] = g.output_range()  # in target units, or None when unknown
        preds[h] = np.concatenate([r.y_pred for r in g.runs[:max_runs]])
    finite = [v for rg in ranges.values() if rg for v in rg if v is not None and math.isfinite(v)]
    everything = [edges[0], edges[-1], *finite, *(p.min() for p in preds.values())]
    everything += [p.max() for p in preds.values()]
    lo, hi = min(everything), max(everything)
    pad = 0.04 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    span = hi - lo
    rng = np.random.default_rng(0)
    labels = []
    for i, h in enumerate(lanes):
        color, rg = colors[h], ranges[h]
        base = first[h].head_range()
        if rg is None:
            labels.append(f"{h}\nrange unknown")
        else:
            left = lo if rg[0] is None else max(rg[0], lo)
            right = hi if rg[1] is None else min(rg[1], hi)
            width = max(right - left, 0.006 * span)  # a band as narrow as (0, 1) stays visible
            ax.barh(i, width, left=left, height=0.6, color=color, alpha=0.25, ec=color, lw=1)
            for end, x, dx in ((rg[0], lo, -1), (rg[1], hi, 1)):
                if end is None:  # unbounded: an arrow off the edge
                    ax.annotate(
                        "",
                        xy=(x, i),
                        xytext=(x - dx * 0.05 * span, i),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5},
                    )
            text = range_text(*base) if base else ""
            if first[h].scaling_text() != "unscaled" and rg != (None, None):  # mapped back
                text += f" → {_mapped_text(rg)}"
            labels.append(f"{h}\n{text}")
        p = preds[h]
        ax.scatter(
            p, i + rng.uniform(-0.2, 0.2, len(p)), s=5, color=color, alpha=0.35, linewidths=0
        )
    top = len(lanes) - 0.4
    heights = 1.6 * counts / (counts.max() or 1)
    ax.bar(
        (edges[:-1] + edges[1:]) / 2,
        heights,
        width=np.diff(edges),
        bottom=top,
        color="0.6",
        ec="0.45",
        lw=0.4,
    )
    ax.axvline(mean, color="0.3", lw=0.8, ls="--")
    ax.text(mean, top + 1.65, f" mean {mean:.3g}", fontsize=7, va="bottom", color="0.3")
    ax.set_yticks([*range(len(lanes)), top + 0.8], [*labels, what.replace(" (", "\n(")])
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylim(-0.6, top + 2.1)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"{target.name}{units(target.unit)}", fontsize=9)
    scaling = first[lanes[0]].scaling_text()
    ax.set_title(f"{target.dataset}, {scaling} targets", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _mapped_text(rg: tuple[float | None, float | None]) -> str:
    lo, hi = ("-∞" if rg[0] is None else f"{rg[0]:.3g}"), ("∞" if rg[1] is None else f"{rg[1]:.3g}")
    return f"({lo}, {hi})"
