"""Turn a sweep's job directories into the answer: tables, figures and a plain verdict.

`python -m housing_reg.report DIR` reads only what jobs wrote to disk (metrics.json,
.hydra/config.yaml, predictions.csv), so it works on a sweep from any launcher, on a directory
holding several sweeps, and on a sweep still being written. Every replica of a job is one run.
Runs are grouped by the settings that differ between jobs (the head, the target scaling, ...);
seeds and folds are what a group repeats over.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from omegaconf import OmegaConf

from housing_reg import record
from housing_reg.record import find_jobs

METRICS = ("test/mae", "train/mae", "val/mae")
# Config keys a job repeats over, or that do not change its numbers: never a group.
REPEATS = {"seed", "data.seed", "data.fold", "data.replicas", "model.replicas"}
BOOKKEEPING = ("output_dir", "threads", "callbacks.", "logger.", "trainer.default_root_dir")
STUCK = 0.2  # a group is "stuck" when this share of its predictions sits at one value


# -- statistics ------------------------------------------------------------------------------
def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df: the closed form of Abramowitz & Stegun
    26.7.3-4, exact up to rounding, so no scipy is needed for one quantile."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term = total = 0.0 if df == 1 else 1.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term = total = 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = confidence (1.96 as df grows), by bisection."""
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Estimate:
    """Mean of n runs with its sample std and the half-width of its 95% Student-t CI."""

    n: int
    mean: float
    std: float
    half: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate:
        a = np.asarray(values, dtype=float)
        if len(a) < 2:
            return cls(len(a), float(a.mean()) if len(a) else math.nan, math.nan, math.nan)
        std = float(a.std(ddof=1))
        return cls(len(a), float(a.mean()), std, t_quantile(0.95, len(a) - 1) * std / len(a) ** 0.5)

    def __str__(self) -> str:
        return f"{self.mean:.2f}" if math.isnan(self.half) else f"{self.mean:.2f} ± {self.half:.2f}"


@dataclass(frozen=True)
class Difference:
    """Mean test MAE of b minus a, with the half-width of its 95% CI."""

    mean: float
    half: float
    how: str
    pairs: int = 0  # runs compared one to one (0: unpaired)
    largest: float = math.nan  # paired only: the largest gap in any single run


def difference(a: Group, b: Group) -> Difference:
    """Paired over (fold, seed) when both groups ran the same ones (the same seed gives the
    same initial weights and batch order, so only the head differs); else Welch's interval
    with its degrees of freedom rounded down, which is conservative."""
    ta, tb = a.by_run("test/mae"), b.by_run("test/mae")
    if ta.keys() == tb.keys() and len(ta) >= 2:
        gaps = [tb[k] - ta[k] for k in ta]
        e = Estimate.of(gaps)
        return Difference(e.mean, e.half, f"paired over {e.n} runs", e.n, max(map(abs, gaps)))
    ea, eb = Estimate.of(list(ta.values())), Estimate.of(list(tb.values()))
    if ea.n < 2 or eb.n < 2:
        return Difference(eb.mean - ea.mean, math.nan, "too few runs for a CI")
    va, vb = ea.std**2 / ea.n, eb.std**2 / eb.n
    if va + vb == 0:
        return Difference(eb.mean - ea.mean, 0.0, "unpaired, no spread at all")
    df = (va + vb) ** 2 / (va**2 / (ea.n - 1) + vb**2 / (eb.n - 1))
    half = t_quantile(0.95, max(1, math.floor(df))) * math.sqrt(va + vb)
    return Difference(eb.mean - ea.mean, half, f"unpaired (Welch), {ea.n} and {eb.n} runs")


# -- reading job directories -----------------------------------------------------------------
@dataclass(eq=False)
class Run:
    """One trained model: a replica of one job."""

    job: str
    fold: int | None
    seed: int
    metrics: dict[str, float]
    curves: dict[str, list[float]]  # metric -> value per epoch
    y_true: np.ndarray
    y_pred: np.ndarray
    duplicate: bool = False  # the same fold and seed already came from another job


@dataclass
class Job:
    path: Path
    status: str  # ok | failed | incomplete | broken
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)


def read_job(path: Path, root: Path) -> Job:
    """A job directory (read by record.read_job) as runs, or the reason it has none."""
    name = summary_name(path, root)
    job = record.read_job(path)
    if job.status != "ok":
        return Job(path, job.status, job.reason)
    try:
        config_file = path / ".hydra" / "config.yaml"
        if not config_file.exists():
            return Job(path, "broken", "no .hydra/config.yaml to say what ran")
        config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        y_true = read_truth(path / "predictions.csv")
        runs = [
            Run(
                job=name,
                fold=job.metrics.get("fold"),
                seed=rep["seed"],
                metrics={k: rep[k] for k in (*METRICS, "test/mse") if k in rep},
                curves=rep["curves"],
                y_true=y_true,
                y_pred=rep["test_pred"].astype(float),
            )
            for rep in job.replicas()
        ]
    except FileNotFoundError as e:
        return Job(path, "broken", f"missing {Path(e.filename).name}")
    except Exception as e:  # whatever is wrong with one job is reported, never fatal
        return Job(path, "broken", f"unreadable ({type(e).__name__}: {e})".replace("\n", " "))
    return Job(path, "ok", settings=settings_of(config), runs=runs)


def read_truth(path: Path) -> np.ndarray:
    """predictions.csv's y_true column: the test targets, in order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("predictions.csv has no rows")
    return np.array([float(r["y_true"]) for r in rows])


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """Flat config minus what a job repeats over; target scaling and range become one label."""
    flat = _flatten(config)
    s = {
        k: v
        for k, v in flat.items()
        if k not in REPEATS and not k.startswith(BOOKKEEPING) and k != "head.activation._target_"
    }
    kind, rng = s.pop("data.target_scaling", "none"), s.pop("data.target_range", "[0, 1]")
    s["scaling"] = (
        f"minmax[{','.join(f'{v:g}' for v in json.loads(rng))}]" if kind == "minmax" else kind
    )
    return s


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


# -- grouping ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Group:
    """All runs of one setting, e.g. head=sigmoid with minmax[0,1] targets."""

    head: str
    rest: tuple[tuple[str, str], ...]  # (key, value) of the other settings that vary, if any
    runs: list[Run]
    order: int = 0  # where its first job came in the directory: ties sort in sweep order
    duplicates: int = 0  # runs seen twice (same fold and seed) and counted once

    @property
    def setting(self) -> str:
        """The non-head part of the label, e.g. "minmax[0,1] targets"."""
        return ", ".join(
            ("raw" if v == "none" else v) + " targets" if k == "scaling" else f"{k}={v}"
            for k, v in self.rest
        )

    @property
    def label(self) -> str:
        return f"{self.head} ({self.setting})" if self.rest else self.head

    def by_run(self, metric: str) -> dict[tuple[int | None, int], float]:
        return {(r.fold, r.seed): r.metrics[metric] for r in self.runs if metric in r.metrics}

    def estimate(self, metric: str) -> Estimate:
        return Estimate.of(list(self.by_run(metric).values()))

    def constant_runs(self) -> int:
        """Runs that predict one price for every test house (a saturated or dead output)."""
        return sum(bool(np.ptp(r.y_pred) <= 1e-3 * (np.ptp(r.y_true) or 1.0)) for r in self.runs)

    def stuck(self) -> tuple[float, float]:
        """Share of test predictions at the runs' lowest (or highest) value, and that value:
        a head pinned at its bound predicts one price for many houses."""
        best = (0.0, math.nan)
        for side in (np.min, np.max):
            values = [float(side(r.y_pred)) for r in self.runs]
            shares = [
                np.mean(np.abs(r.y_pred - v) <= 1e-3 * (np.ptp(r.y_true) or 1.0))
                for r, v in zip(self.runs, values, strict=True)
            ]
            best = max(best, (float(np.mean(shares)), float(np.median(values))))
        return best


def group_runs(jobs: list[Job]) -> tuple[list[Group], list[str], dict[str, Any]]:
    """Groups sorted best first, the names of the varying settings, and the common ones."""
    ok = [j for j in jobs if j.status == "ok"]
    keys = sorted({k for j in ok for k in j.settings})
    varying = [k for k in keys if len({repr(j.settings.get(k)) for j in ok}) > 1]
    common = {k: ok[0].settings.get(k) for k in keys if k not in varying} if ok else {}
    shown = ["scaling"] if "scaling" in varying else []
    shown += [k for k in varying if k not in ("head.name", "scaling")]
    groups: dict[tuple, Group] = {}
    for j in ok:
        key = tuple(repr(j.settings.get(k)) for k in varying)
        rest = tuple((k, str(j.settings.get(k))) for k in shown)
        head = str(j.settings.get("head.name", "?"))
        g = groups.setdefault(key, Group(head, rest, [], order=len(groups)))
        seen = {(r.fold, r.seed) for r in g.runs}
        for run in j.runs:
            if (run.fold, run.seed) in seen:
                g.duplicates += 1
                run.duplicate = True
            else:
                g.runs.append(run)
                seen.add((run.fold, run.seed))
    ordered = sorted(groups.values(), key=lambda g: g.estimate("test/mae").mean)
    return ordered, shown, common


# -- tables and verdict --------------------------------------------------------------------------
def summary_table(groups: list[Group], shown: list[str]) -> str:
    """Markdown: one row per group, best test MAE first; ± is the 95% CI half-width."""
    has_val = any(g.by_run("val/mae") for g in groups)
    head = ["head", *shown, "runs", "test MAE", "std", "95% CI", "train MAE"]
    head += ["val MAE"] if has_val else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        t = g.estimate("test/mae")
        ci = "n/a" if math.isnan(t.half) else f"{t.mean - t.half:.2f} – {t.mean + t.half:.2f}"
        cells = [g.head, *(v for _, v in g.rest), str(t.n), f"**{t}**", f"{t.std:.2f}", ci]
        cells.append(str(g.estimate("train/mae")))
        cells += [str(g.estimate("val/mae"))] if has_val else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_table(groups: list[Group]) -> str:
    """Markdown: test MAE, heads down and the other setting across (when just one varies)."""
    rests = settings_order(groups)
    heads = list(dict.fromkeys(g.head for g in groups))
    cell = {(g.head, g.rest): f"{g.estimate('test/mae')}" for g in groups}
    lines = [
        "| head | " + " | ".join(_first(groups, r).setting for r in rests) + " |",
        "|" + "---|" * (len(rests) + 1),
    ]
    for h in heads:
        lines.append(f"| {h} | " + " | ".join(cell.get((h, r), "") for r in rests) + " |")
    return "\n".join(lines)


def verdict(groups: list[Group]) -> list[str]:
    """Plain sentences: the winner, which steps in the ranking are real, relu vs none,
    and which heads are pinned at one value."""
    if not groups:
        return []
    best = groups[0]
    lines = [f"Best: {best.label}, test MAE {best.estimate('test/mae')} ($1000s, 95% CI)."]
    pairs = list(zip(groups, groups[1:], strict=False))  # each step down the ranking
    by_setting = {(g.head, g.rest): g for g in groups}
    for g in groups:  # and relu against none under the same other settings
        none = by_setting.get(("none", g.rest))
        if g.head == "relu" and none:
            pair = tuple(sorted((g, none), key=groups.index))
            if pair not in pairs:
                pairs.append(pair)
    for a, b in pairs:
        lines.append(compare(a, b))
    for g in groups:
        share, value = g.stuck()
        dead = g.constant_runs()
        every = f"{dead} of {len(g.runs)} runs predict{'s' * (dead == 1)} one price for every house"
        if share >= STUCK:
            lines.append(
                f"{g.label}: {share:.0%} of test predictions sit at {value:.2f}, one price for "
                "many houses: the head's output is pinned at its bound"
                + (f"; {every}." if dead else ".")
            )
        elif dead:
            lines.append(f"{g.label}: {every} (its output unit stopped learning).")
    return lines


def compare(a: Group, b: Group) -> str:
    """One sentence on b versus the better-ranked a."""
    d = difference(a, b)
    ratio = b.estimate("test/mae").mean / a.estimate("test/mae").mean
    name = f"{a.label} vs {b.label}"
    if math.isnan(d.half):
        return f"{name}: {b.label} worse by {d.mean:.3f}; {d.how}."
    if d.largest == 0:
        return f"{name}: identical test MAE in each of the {d.pairs} paired runs."
    ci = f"95% CI {d.mean - d.half:.3f} to {d.mean + d.half:.3f}, {d.how}"
    if d.mean - d.half > 0:
        times = f", {ratio:.1f}x the error" if ratio >= 1.5 else ""
        return f"{name}: clear difference, {b.label} worse by {d.mean:.2f}{times} ({ci})."
    largest = "" if math.isnan(d.largest) else f"; largest gap in any one run {d.largest:.3f}"
    ta, tb = (np.array(list(g.by_run("test/mae").values())) for g in (a, b))
    coin = (tb[:, None] < ta[None, :]).mean()  # one run of each, as a single comparison does
    return (
        f"{name}: within noise, difference {d.mean:.3f} ({ci}, includes 0{largest}); "
        f"one run of each, {b.label} wins {coin:.0%} of the pairings."
    )


def summary_rows(jobs: list[Job], root: Path, shown: list[str]) -> list[dict[str, Any]]:
    """summary.csv: one row per run; jobs without runs get one row saying why."""
    rows = []
    for j in jobs:
        base = {
            "job": summary_name(j.path, root),
            "status": j.status,
            "head": j.settings.get("head.name", ""),
        }
        base |= {k: j.settings.get(k, "") for k in shown}
        if not j.runs:
            rows.append(base | {"error": j.reason})
        for r in j.runs:
            rows.append(
                base
                | {"fold": r.fold, "seed": r.seed}
                | {k.replace("/", "_"): r.metrics.get(k, "") for k in (*METRICS, "test/mse")}
                | {"epochs": len(r.curves.get("train/mae", []))}
                | {"note": "duplicate, counted once" if r.duplicate else ""}
            )
    return rows


# -- figures -------------------------------------------------------------------------------------
def settings_order(groups: list[Group]) -> list[tuple]:
    """Non-head settings in reading order: raw targets, standard, then the rest as swept."""
    rank = {"none": 0, "standard": 1}
    first = {}
    for g in sorted(groups, key=lambda g: g.order):
        first.setdefault(g.rest, g.order)
    return sorted(first, key=lambda rest: ([rank.get(v, 2) for _, v in rest], first[rest]))


def head_colors(groups: list[Group]) -> dict[str, str]:
    heads = list(dict.fromkeys(g.head for g in groups))
    return {h: f"C{i % 10}" for i, h in enumerate(heads)}


def needs_log(values: Sequence[float]) -> bool:
    """A log axis when the largest value is over 5 times the smallest."""
    v = [x for x in values if x > 0 and math.isfinite(x)]
    return bool(v) and max(v) / min(v) > 5


def log_y(ax) -> None:
    """Log scale with plain ticks at 1, 2, 3, 5, 10, 20, ..."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_mae_by_head(groups: list[Group], path: Path) -> None:
    """Test MAE per head: every run as a faint dot, the mean with its 95% CI as a bar."""
    heads = list(dict.fromkeys(g.head for g in groups))
    rests = settings_order(groups)
    fig = Figure(figsize=(max(5.0, 1.1 * len(heads) * max(1, len(rests)) ** 0.5 + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(rests)
    rng = np.random.default_rng(0)
    for k, rest in enumerate(rests):
        color = f"C{k % 10}"
        for g in (g for g in groups if g.rest == rest):
            x = heads.index(g.head) - 0.4 + width * (k + 0.5)
            vals = list(g.by_run("test/mae").values())
            ax.scatter(
                x + rng.uniform(-width / 4, width / 4, len(vals)),
                vals,
                s=6,
                color=color,
                alpha=0.25,
                linewidths=0,
            )
            e = g.estimate("test/mae")
            ax.errorbar(
                x,
                e.mean,
                yerr=0 if math.isnan(e.half) else e.half,
                fmt="o",
                color=color,
                capsize=4,
                ms=5,
                label=g.setting if g is _first(groups, rest) else None,
            )
    ax.set_xticks(range(len(heads)), heads)
    ax.set_xlabel("output head")
    ax.set_ylabel("test MAE ($1000s)")
    if needs_log([g.estimate("test/mae").mean for g in groups]):
        log_y(ax)
    ax.set_title("Test MAE per head: runs (dots), mean and 95% CI (bars)")
    if rests != [()]:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=90, pil_kwargs={"optimize": True})


def _first(groups: list[Group], rest: tuple) -> Group:
    return next(g for g in groups if g.rest == rest)


def draw_pred_vs_true(ax, y_true: np.ndarray, y_pred: np.ndarray, title: str, color="C0") -> None:
    """Predictions of one or more runs (rows of y_pred) against the true prices."""
    y_pred = np.atleast_2d(y_pred)
    x = np.broadcast_to(y_true, y_pred.shape)  # one test set for all runs, or one per run
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


def pred_vs_true_figure(y_true, y_pred, title: str) -> Figure:
    """One job's test predictions; train.py logs it to TensorBoard's Images tab."""
    fig = Figure(figsize=(3.6, 3.4))
    ax = fig.subplots()
    draw_pred_vs_true(ax, np.asarray(y_true), np.asarray(y_pred), title)
    ax.set_xlabel("true price ($1000s)")
    ax.set_ylabel("predicted")
    fig.tight_layout()
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a figure, without pyplot's global state."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_pred_vs_true(groups: list[Group], path: Path, max_runs: int = 20) -> None:
    """One panel per head (rows: the other settings); a flat line is a head at its bound."""
    heads = list(dict.fromkeys(g.head for g in groups))
    rests = settings_order(groups)
    colors = head_colors(groups)
    fig = Figure(figsize=(2.3 * len(heads) + 0.6, 2.3 * len(rests) + 0.6))
    axes = np.atleast_2d(
        fig.subplots(len(rests), len(heads), sharex=True, sharey=True, squeeze=False)
    )
    for g in groups:
        ax = axes[rests.index(g.rest), heads.index(g.head)]
        runs = g.runs[:max_runs]  # enough to show the pattern, few enough to draw quickly
        title = f"{g.label}\nMAE {g.estimate('test/mae').mean:.2f}"
        y_true, y_pred = (np.stack([getattr(r, a) for r in runs]) for a in ("y_true", "y_pred"))
        draw_pred_vs_true(ax, y_true, y_pred, title, colors[g.head])
        share, value = g.stuck()
        if share >= STUCK:
            ax.text(
                0.04,
                0.96,
                f"{share:.0%} at {value:.2f}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
    for ax in axes.ravel():
        if not ax.has_data():
            ax.set_axis_off()
    for ax in axes[-1]:
        ax.set_xlabel("true price ($1000s)")
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted")
    fig.suptitle("Test predictions vs true prices (dashed: perfect)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})


def plot_curves(groups: list[Group], path: Path) -> None:
    """MAE per epoch, mean over runs with a ±1 std band: a panel per metric and setting."""
    metrics = [
        m for m in ("train/mae", "val/mae") if any(r.curves.get(m) for g in groups for r in g.runs)
    ]
    rests = settings_order(groups)
    grid = [(m, rest) for m in metrics for rest in rests]
    rows, cols = (1, len(metrics)) if len(rests) == 1 else (len(metrics), len(rests))
    colors = head_colors(groups)
    styles = {h: ("-", "--", ":", "-.")[i % 4] for i, h in enumerate(colors)}  # shows overlaps
    fig = Figure(figsize=(3.6 * cols + 0.4, 2.8 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, (metric, rest) in zip(axes, grid, strict=True):
        for g in (g for g in groups if g.rest == rest):
            curves = [r.curves[metric] for r in g.runs if r.curves.get(metric)]
            if not curves:
                continue
            by_epoch = [[c[e] for c in curves if len(c) > e] for e in range(max(map(len, curves)))]
            mean = np.array([np.mean(v) for v in by_epoch])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in by_epoch])
            epochs = np.arange(1, len(mean) + 1)
            color = colors[g.head]
            ax.plot(epochs, mean, color=color, ls=styles[g.head], label=g.head, lw=1.5)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        setting = f" ({_first(groups, rest).setting})" if rest else ""
        ax.set_title(metric + setting, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[-cols:]:
        ax.set_xlabel("epoch")
    for ax in axes[::cols]:
        ax.set_ylabel("MAE ($1000s)")
    if needs_log([y for ax in axes for line in ax.get_lines() for y in line.get_ydata()]):
        log_y(axes[0])  # shared: one call sets every panel
    axes[cols - 1].legend(fontsize=8)
    fig.suptitle("MAE per epoch: mean over runs, band ±1 std", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})


# -- entry point ---------------------------------------------------------------------------------
class ReportError(ValueError):
    """Nothing to report on; the message says why and what to pass instead."""


def report(root: Path, out: Path | None = None) -> tuple[str, int]:
    """Read root; write summary.csv, summary.md and (given runs) three figures into out.

    Returns the markdown summary and the number of runs it covers.
    """
    out = out or root
    jobs = [read_job(p, root) for p in find_jobs(root)]
    if not jobs:
        raise ReportError(
            f"{root}: no job directories found (none holds .hydra/); "
            "pass a sweep directory such as multirun/2024-01-01/12-00-00"
        )
    groups, shown, common = group_runs(jobs)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(jobs, root, shown)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    left_out = [j for j in jobs if j.status != "ok"]
    n_runs = sum(len(g.runs) for g in groups)
    text = [
        f"# Sweep report: {root}",
        "",
        f"{n_runs} runs from {len(jobs) - len(left_out)} finished job(s); "
        f"{len(left_out)} job(s) left out" + (" (listed below)." if left_out else "."),
    ]
    dupes = sum(g.duplicates for g in groups)
    if dupes:
        text.append(f"{dupes} duplicate run(s) (same fold and seed twice) counted once.")
    names = ("scaling", "trainer.max_epochs", "optim.lr", "data.batch_size", "data.num_folds")
    settings = ", ".join(f"{k}={common[k]}" for k in names if k in common)
    if settings:
        text.append(f"Common settings: {settings}.")
    if groups:
        text += [
            "",
            "MAE in $1000s: mean ± half-width of the 95% confidence interval of the mean "
            "(Student t over runs; each seed and fold is one run).",
            "",
            summary_table(groups, shown),
            "",
        ]
        if len(shown) == 1:
            text += [f"Test MAE by head and {shown[0]}:", "", pivot_table(groups), ""]
        text += [
            "## Verdict",
            "",
            *[f"- {line}" for line in verdict(groups)],
        ]
        plot_mae_by_head(groups, out / "mae_by_head.png")
        plot_pred_vs_true(groups, out / "pred_vs_true.png")
        plot_curves(groups, out / "curves.png")
    if left_out:
        text += ["", "## Left out", ""]
        text += [f"- {summary_name(j.path, root)}: {j.status}: {j.reason}" for j in left_out]
    md = "\n".join(text) + "\n"
    (out / "summary.md").write_text(md)
    return md, n_runs


def summary_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else path.name


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m housing_reg.report",
        description="Summarize a sweep (or a directory of sweeps): summary.csv, summary.md, "
        "mae_by_head.png, pred_vs_true.png, curves.png and a verdict.",
    )
    p.add_argument("dir", type=Path, help="sweep directory, e.g. multirun/2024-01-01/12-00-00")
    p.add_argument("--out", type=Path, help="where to write (default: the sweep directory)")
    args = p.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir}: no such directory; pass a sweep directory", file=sys.stderr)
        return 2
    try:
        md, n_runs = report(args.dir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    out = args.out or args.dir
    if not n_runs:
        print(
            f"error: {args.dir}: no finished runs yet; rerun once jobs have written metrics.json",
            file=sys.stderr,
        )
        return 1
    print(f"wrote summary.csv, summary.md, mae_by_head.png, pred_vs_true.png, curves.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
