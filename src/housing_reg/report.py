"""Turn a sweep's job directories into the answer: tables, figures and a plain verdict.

`python -m housing_reg.report DIR` reads only what jobs wrote to disk (metrics.json,
.hydra/config.yaml, predictions.csv), so it works on a sweep from any launcher, on a directory
holding several sweeps, and on a sweep still being written. Every replica of a job is one run.
Runs are grouped by the settings that differ between jobs (the head, the data set, the target
scaling, ...); seeds and folds are what a group repeats over. MAEs are compared only where
they share units and meaning: within one data set and target, and within one target scaling
unless the sweep varies nothing but the scaling.
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
from omegaconf import OmegaConf

from housing_reg.figures import (
    plot_answer,
    plot_curves,
    plot_mae_by_head,
    plot_pred_vs_true,
    scaling_text,
    setting_text,
    settings_order,
    units,
)
from housing_reg.jobdir import find_jobs, is_bookkeeping, read_state, short_names
from housing_reg.stats import (  # noqa: F401 (t_quantile, t_two_sided: part of this API)
    NO_CI,
    Difference,
    Estimate,
    difference,
    t_quantile,
    t_two_sided,
)

SHOWN = ("test/mae", "train/mae", "val/mae")
# Config keys a job repeats over, or that do not change its numbers: never a group.
# (Bookkeeping keys, jobdir.BOOKKEEPING, are never settings either.)
REPEATS = {"seed", "data.seed", "data.fold", "data.replicas", "model.replicas", "threads"}
# How a job names and reads its data: folded into the one setting "data" (the data set's name).
DATA_NAMING = (
    "data.name",
    "data.path",
    "data.target_label",
    "data.target_unit",
    "data.delimiter",
    "data.decimal",
)
STUCK = 0.2  # a group is "stuck" when this share of its predictions sits at one value
FIGURES = ("answer.png", "mae_by_head.png", "pred_vs_true.png", "curves.png")
DUPLICATE = "duplicate, counted once"
MORE_SEEDS = "run more seeds (seed='range(10)' or model.replicas=10)"


# -- reading job directories -----------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What a job's metrics.json says about its data and target. Jobs from before these were
    recorded get the data set from their config, no unit and generic words."""

    dataset: str
    name: str  # display name, e.g. MEDV
    unit: str = ""  # e.g. $1000s; "" when there is none (or it was not recorded)
    recorded: bool = False

    @property
    def noun(self) -> str:
        """What one target is: "price" on Boston housing, "value" on anything else."""
        return "price" if self.recorded and self.dataset == "boston" else "value"

    @property
    def item(self) -> str:
        """What one row is: "house" on Boston housing, "row" on anything else."""
        return "house" if self.recorded and self.dataset == "boston" else "row"

    @property
    def units(self) -> str:
        return units(self.unit)


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
    scaler: tuple[float, float] | None = None  # (shift, scale): scaled t means t*scale + shift
    train: dict[str, Any] | None = None  # metrics.json's train_targets (histogram, mean, ...)
    duplicate: bool = False  # the same fold and seed already came from another job
    head_range: tuple[float | None, float | None] | None = None  # config's head.range


@dataclass
class JobRuns:
    path: Path
    status: str  # ok | failed | incomplete | broken
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    target: Target | None = None
    note: str = ""  # jobdir.JobState.note: a later retry failed or was interrupted


def read_runs(path: Path, root: Path) -> JobRuns:
    """A job directory (read by jobdir.read_state) as runs, or the reason it has none."""
    name = summary_name(path, root)
    job = read_state(path)
    if job.status != "ok":
        return JobRuns(path, job.status, job.reason)
    try:
        m = job.metrics
        # The settings the result was trained with, from the result itself: a later start in
        # this directory rewrites .hydra/config.yaml (older results lack the config there).
        config = m.get("config")
        if not isinstance(config, dict):
            config_file = path / ".hydra" / "config.yaml"
            if not config_file.exists():
                return JobRuns(path, "broken", "no .hydra/config.yaml to say what ran")
            config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        target = target_of(m, config)
        settings = settings_of(config, target.dataset)
        scaler, train = scaler_of(m, settings["scaling"]), m.get("train_targets")
        y_true = read_truth(path / "predictions.csv")
        runs = [
            Run(
                job=name,
                fold=job.metrics.get("fold"),
                seed=rep["seed"],
                metrics={k: rep[k] for k in (*SHOWN, "test/mse") if k in rep},
                curves=rep["curves"],
                y_true=y_true,
                y_pred=rep["test_pred"].astype(float),
                scaler=scaler,
                train=train,
                head_range=head_range_of(config),
            )
            for rep in job.replicas()
        ]
    except FileNotFoundError as e:
        return JobRuns(path, "broken", f"missing {Path(e.filename).name}")
    except Exception as e:  # whatever is wrong with one job is reported, never fatal
        return JobRuns(path, "broken", f"unreadable ({type(e).__name__}: {e})".replace("\n", " "))
    return JobRuns(path, "ok", settings=settings, runs=runs, target=target, note=job.note)


def head_range_of(config: dict[str, Any]) -> tuple[float | None, float | None] | None:
    """head.range from a job's config; None for a job from before heads stated their range."""
    rng = config.get("head", {}).get("range")
    if not isinstance(rng, list) or len(rng) != 2:
        return None
    return tuple(None if v is None else float(v) for v in rng)  # type: ignore[return-value]


def target_of(metrics: dict[str, Any], config: dict[str, Any]) -> Target:
    """The job's data set and target as it recorded them, else what its config implies."""
    data = config.get("data") or {}
    if "dataset" in metrics and isinstance(metrics.get("target"), dict):
        t = metrics["target"]
        name, unit = str(t.get("name") or data.get("target") or "target"), str(t.get("unit") or "")
        return Target(str(metrics["dataset"]), name, unit, recorded=True)
    path = data.get("path")
    dataset = Path(str(path)).stem if path else str(data.get("name") or "boston")
    return Target(dataset, str(data.get("target_label") or data.get("target") or "target"))


def scaler_of(metrics: dict[str, Any], scaling: str) -> tuple[float, float] | None:
    """(shift, scale) mapping the head's output into target units; None when unknown."""
    rec = (metrics.get("train_targets") or {}).get("scaler")
    if rec:
        return float(rec["shift"]), float(rec["scale"])
    return (0.0, 1.0) if scaling == "none" else None


def read_truth(path: Path) -> np.ndarray:
    """predictions.csv's y_true column: the test targets, in order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("predictions.csv has no rows")
    return np.array([float(r["y_true"]) for r in rows])


def settings_of(config: dict[str, Any], dataset: str = "boston") -> dict[str, Any]:
    """Flat config minus what a job repeats over; the data set's name becomes "data", target
    scaling and range one label, "scaling"."""
    flat = _flatten(config)
    s = {
        k: v
        for k, v in flat.items()
        if k not in REPEATS
        and k not in DATA_NAMING
        and not is_bookkeeping(k)
        and not (k.startswith("head.") and k != "head.name")  # activation, range: the head
    }
    s["data"] = dataset
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


def shown_value(key: str, value: Any) -> str:
    return str(value).rsplit(".", 1)[-1] if key.endswith("._target_") else str(value)


# -- grouping ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pin:
    """A share of test predictions sitting at one value (in target units), and what it is."""

    share: float
    value: float
    bound: str = ""  # e.g. "sigmoid's upper bound"; "" when not a known bound of the head


@dataclass(eq=False)
class Group:
    """All runs of one setting, e.g. head=sigmoid with minmax[0,1] targets."""

    head: str
    rest: tuple[tuple[str, str], ...]  # (short name, value) of the other settings that vary
    runs: list[Run]
    target: Target
    scaling: str = "none"
    order: int = 0  # where its first job came in the directory: ties sort in sweep order
    duplicates: int = 0  # runs seen twice (same fold and seed) and counted once

    @property
    def setting(self) -> str:
        """The non-head part of the label, e.g. "minmax[0,1] targets"."""
        return setting_text(self.rest)

    @property
    def label(self) -> str:
        return self.label_without(())

    def label_without(self, drop: Sequence[str]) -> str:
        """The label less the settings every group it is compared with shares."""
        rest = self.rest_without(drop)
        return f"{self.head} ({setting_text(rest)})" if rest else self.head

    def rest_without(self, drop: Sequence[str]) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.rest if k not in drop)

    def scaling_rest(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.rest if k == "scaling")

    def scaling_text(self) -> str:
        return scaling_text(self.scaling)

    def by_run(self, metric: str) -> dict[tuple[int | None, int], float]:
        return {(r.fold, r.seed): r.metrics[metric] for r in self.runs if metric in r.metrics}

    def estimate(self, metric: str) -> Estimate:
        return Estimate.of(list(self.by_run(metric).values()))

    def constant_runs(self) -> int:
        """Runs that predict one value for every test row (a saturated or dead output)."""
        return sum(bool(np.ptp(r.y_pred) <= 1e-3 * (np.ptp(r.y_true) or 1.0)) for r in self.runs)

    def head_range(self) -> tuple[float | None, float | None] | None:
        """The head's own output range, as its config states it (conf/head/*.yaml: range),
        None if the job recorded none; None inside the pair: unbounded on that side."""
        return self.runs[0].head_range if self.runs else None

    def output_range(self) -> tuple[float | None, float | None] | None:
        """The head's output range in target units (its first run's scaler), None if unknown;
        None inside the pair: unbounded on that side."""
        base = self.head_range()
        scaler = self.runs[0].scaler if self.runs else None
        if base is None or scaler is None:
            return None
        shift, scale = scaler
        return tuple(None if b is None else b * scale + shift for b in base)  # type: ignore

    def pinned(self) -> Pin:
        """The largest share of test predictions at one value: at one of the head's bounds
        (mapped into target units run by run) when it has any, else at the runs' lowest or
        highest prediction."""
        pins = []
        bounds = self.head_range() or (None, None)
        for side, b in zip(("lower", "upper"), bounds, strict=True):
            if b is None or any(r.scaler is None for r in self.runs):
                continue
            values = [b * r.scaler[1] + r.scaler[0] for r in self.runs]  # type: ignore[index]
            share = np.mean([_share_at(r, v) for r, v in zip(self.runs, values, strict=True)])
            scaled = "" if self.scaling == "none" else f" {b:g} on {self.scaling} targets"
            bound = f"{self.head}'s {side} bound{scaled}"
            pins.append((float(share), 1, Pin(float(share), float(np.median(values)), bound)))
        for side in (np.min, np.max):
            values = [float(side(r.y_pred)) for r in self.runs]
            share = np.mean([_share_at(r, v) for r, v in zip(self.runs, values, strict=True)])
            pins.append((float(share), 0, Pin(float(share), float(np.median(values)))))
        return max(pins, key=lambda p: p[:2])[2]


def _share_at(run: Run, value: float) -> float:
    return float(np.mean(np.abs(run.y_pred - value) <= 1e-3 * (np.ptp(run.y_true) or 1.0)))


@dataclass
class Comparison:
    """Groups sorted by data set, then best first; the settings that vary, and the rest."""

    groups: list[Group]
    shown: list[str]  # varying settings other than the head, as config keys
    names: dict[str, str]  # their short names
    common: dict[str, Any]  # settings every job shares
    varying: list[str]

    def blocks(self) -> list[tuple[tuple[tuple[str, str], ...], list[Group]]]:
        """Groups whose test MAEs may be compared, with the settings they share: the same data
        set and target always (different units and meaning otherwise); the same target scaling
        too, unless the sweep varies nothing but data and scaling (then scalings are what it
        compares)."""
        keep = ["data", "data.target"]
        if any(k not in ("data", "data.target", "scaling") for k in self.varying):
            keep.append("scaling")
        keys = [self.names[k] for k in keep if k in self.shown]
        out: dict[tuple, list[Group]] = {}
        for g in self.groups:
            key = tuple((k, v) for k, v in g.rest if k in keys)
            out.setdefault(key, []).append(g)
        data = list(dict.fromkeys(g.target.dataset for g in self.groups))
        rank = {"none": 0, "standard": 1}  # unscaled targets first, as in the figures
        return sorted(
            out.items(),
            key=lambda kv: (
                data.index(kv[1][0].target.dataset),
                [rank.get(v, 2) for k, v in kv[0] if k == "scaling"],
                min(g.order for g in kv[1]),
            ),
        )


def group_runs(jobs: list[JobRuns]) -> Comparison:
    """Runs grouped by the settings that vary between jobs."""
    ok = [j for j in jobs if j.status == "ok"]
    keys = sorted({k for j in ok for k in j.settings})
    varying = [k for k in keys if len({repr(j.settings.get(k)) for j in ok}) > 1]
    common = {k: ok[0].settings.get(k) for k in keys if k not in varying} if ok else {}
    first = [k for k in ("data", "data.target", "scaling") if k in varying]
    if {"data", "data.target"} <= set(first) and all(  # each data set with its own target
        len({j.settings.get("data.target") for j in ok if j.settings["data"] == d}) == 1
        for d in {j.settings["data"] for j in ok}
    ):
        first.remove("data.target")  # shown as the data set
    hidden = ("head.name", "data", "data.target", "scaling")
    shown = first + [k for k in varying if k not in hidden]
    names = short_names(shown)
    groups: dict[tuple, Group] = {}
    for j in ok:
        key = tuple(repr(j.settings.get(k)) for k in varying)
        rest = tuple((names[k], shown_value(k, j.settings.get(k))) for k in shown)
        head = str(j.settings.get("head.name", "?"))
        g = groups.setdefault(
            key, Group(head, rest, [], j.target, j.settings["scaling"], order=len(groups))
        )
        seen = {(r.fold, r.seed) for r in g.runs}
        for run in j.runs:
            if (run.fold, run.seed) in seen:
                g.duplicates += 1
                run.duplicate = True
            else:
                g.runs.append(run)
                seen.add((run.fold, run.seed))
    data_order = {d: i for i, d in enumerate(dict.fromkeys(j.target.dataset for j in ok))}
    ordered = sorted(
        groups.values(),
        key=lambda g: (data_order[g.target.dataset], g.estimate("test/mae").mean),
    )
    return Comparison(ordered, shown, names, common, varying)


# -- tables and verdict --------------------------------------------------------------------------
def summary_table(sweep: Comparison) -> str:
    """Markdown: one row per group, best test MAE first; ± is the 95% CI half-width."""
    groups = sweep.groups
    has_val = any(g.by_run("val/mae") for g in groups)
    unit = one_unit(groups)
    head = ["head", *(sweep.names[k] for k in sweep.shown), "runs", f"test MAE{units(unit)}"]
    head += ["std", "95% CI", "train MAE"] + (["val MAE"] if has_val else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        t = g.estimate("test/mae")
        cells = [g.head, *(v for _, v in g.rest), str(t.n), f"**{t}**", t.std_text(), t.ci_text()]
        cells.append(str(g.estimate("train/mae")))
        cells += [str(g.estimate("val/mae"))] if has_val else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_unit(groups: list[Group]) -> str:
    """The unit every group shares ("" when they differ or have none)."""
    found = {g.target.unit for g in groups}
    return found.pop() if len(found) == 1 else ""


def pivot_table(groups: list[Group]) -> str:
    """Markdown: test MAE, heads down and the other setting across (when just one varies)."""
    rests = settings_order(groups)
    heads = list(dict.fromkeys(g.head for g in groups))
    cell = {(g.head, g.rest): f"{g.estimate('test/mae')}" for g in groups}
    lines = [
        "| head | " + " | ".join(setting_text(r) for r in rests) + " |",
        "|" + "---|" * (len(rests) + 1),
    ]
    for h in heads:
        lines.append(f"| {h} | " + " | ".join(cell.get((h, r), "") for r in rests) + " |")
    return "\n".join(lines)


def verdict(sweep: Comparison) -> list[str]:
    """Markdown bullets: per block of comparable groups, the best setting (or why there is
    none), which steps in the ranking are real, relu vs none, and which heads sit at a bound."""
    blocks = sweep.blocks()
    lines = []
    for shared, block in blocks:
        drop = [k for k, _ in shared]
        body = block_verdict(sorted(block, key=lambda g: g.estimate("test/mae").mean), drop)
        if len(blocks) > 1:
            t = block[0].target
            about = (t.name + (f", {t.unit}" if t.unit else "")) if "data" in drop else ""
            lines.append(f"- **{setting_text(shared)}**" + (f" ({about})" if about else "") + ":")
            lines += [f"  - {line}" for line in body]
        else:
            lines += [f"- {line}" for line in body]
    return lines


def block_verdict(ranked: list[Group], drop: Sequence[str]) -> list[str]:
    lines = [headline(ranked, drop)] if len(ranked) > 1 else []
    pairs = list(zip(ranked, ranked[1:], strict=False))  # each step down the ranking
    by_setting = {(g.head, g.rest): g for g in ranked}
    for g in ranked:  # and relu against none under the same other settings
        none = by_setting.get(("none", g.rest))
        if g.head == "relu" and none:
            pair = tuple(sorted((g, none), key=ranked.index))
            if pair not in pairs:
                pairs.append(pair)
    if lines and lines[0].startswith("Best:"):  # the headline already gives that step
        pairs = pairs[1:]
    lines += [compare(a, b, drop) for a, b in pairs]
    lines += [line for g in ranked if (line := pin_line(g, drop))]
    return lines


def headline(ranked: list[Group], drop: Sequence[str]) -> str:
    """The best setting, named only when it is clearly ahead of every other; else who ties
    with it and why."""
    what = "head" if all(not g.rest_without(drop) for g in ranked) else "setting"
    best, unit = ranked[0], ranked[0].target.unit
    label = best.label_without(drop)
    if all(g.estimate("test/mae").n < 2 for g in ranked):
        same = [g.label_without(drop) for g in ranked[1:] if _diff(best, g).identical]
        tie = f" {_join([label, *same])} tie: identical in every run." if same else ""
        return f"No best {what}: one run per {what}, so no confidence interval; {MORE_SEEDS}.{tie}"
    tied = [(g, d) for g in ranked[1:] if (d := _diff(best, g)).kind != "clear"]
    if not tied:
        d = _diff(best, ranked[1])
        return (
            f"Best: {label}, test MAE {best.estimate('test/mae')} "
            f"({unit + ', ' if unit else ''}95% CI); clearly ahead of "
            f"{ranked[1].label_without(drop)} by {d.mean:.2f} "
            f"(95% CI {d.mean - d.half:.2f} to {d.mean + d.half:.2f}, {d.how})."
        )
    why = []
    for g, d in tied:
        other = g.label_without(drop)
        if d.identical:
            why.append(f"{other} identical to {label} in every run")
        elif d.kind == "no CI":
            why.append(f"{other}: one run only, no confidence interval; {MORE_SEEDS}")
        else:
            why.append(
                f"{other} within noise of {label} (95% CI of the difference "
                f"{d.mean - d.half:.3f} to {d.mean + d.half:.3f} includes 0)"
            )
    names = _join([label, *(g.label_without(drop) for g, _ in tied)])
    return f"No best {what}: {names} tie for the lowest test MAE: {'; '.join(why)}."


def _diff(a: Group, b: Group) -> Difference:
    return difference(a.by_run("test/mae"), b.by_run("test/mae"))


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def compare(a: Group, b: Group, drop: Sequence[str] = ()) -> str:
    """One sentence on b versus the better-ranked a."""
    d = _diff(a, b)
    la, lb = a.label_without(drop), b.label_without(drop)
    ratio = b.estimate("test/mae").mean / a.estimate("test/mae").mean
    if d.identical:
        return f"{la} and {lb} tie: identical test MAE in every run ({d.how})."
    if d.kind == "no CI":
        each = "one run each" if d.pairs == 1 else d.how
        return f"{la} vs {lb}: {lb} higher by {_num(d.mean)} ({each}; no confidence interval)."
    ci = f"95% CI {d.mean - d.half:.3f} to {d.mean + d.half:.3f}, {d.how}"
    if d.kind == "clear":
        times = f", {ratio:.1f}x the error" if ratio >= 1.5 else ""
        return f"{la} vs {lb}: clear difference, {lb} worse by {d.mean:.2f}{times} ({ci})."
    largest = "" if math.isnan(d.largest) else f"; largest gap in any one run {d.largest:.3f}"
    ta, tb = (np.array(list(g.by_run("test/mae").values())) for g in (a, b))
    coin = (tb[:, None] < ta[None, :]).mean()  # one run of each, as a single comparison does
    return (
        f"{la} and {lb} tie within noise: difference {d.mean:.3f} ({ci}, includes 0{largest}); "
        f"one run of each, {lb} wins {coin:.0%} of the pairings."
    )


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 0.1 else f"{x:.2f}"


def pin_line(g: Group, drop: Sequence[str] = ()) -> str | None:
    """A head pinned at one value (its bound, when known), or runs that predict one value for
    every row; None when neither."""
    t, label = g.target, g.label_without(drop)
    dead = g.constant_runs()
    every = (
        f"{dead} of {len(g.runs)} runs predict{'s' * (dead == 1)} one {t.noun} for every {t.item}"
    )
    pin = g.pinned()
    if pin.share >= STUCK:
        at = (
            "every test prediction sits at"
            if pin.share > 0.9995
            else f"{pin.share:.0%} of test predictions sit at"
        )
        mean = float(np.mean([r.y_true.mean() for r in g.runs]))
        gap = f"{abs(mean - pin.value):.2f} {'below' if pin.value < mean else 'above'}"
        where = f"{pin.value:.2f}" + (f" ({pin.bound})" if pin.bound else "")
        return f"{label}: {at} {where}, {gap} the mean test target {mean:.2f}{t.units}" + (
            f"; {every}." if dead else "."
        )
    if dead:
        return f"{label}: {every} (its output unit stopped learning)."
    return None


def summary_rows(jobs: list[JobRuns], root: Path, sweep: Comparison) -> list[dict[str, Any]]:
    """summary.csv: one row per run; jobs without runs get one row saying why."""
    rows = []
    for j in jobs:
        base = {
            "job": summary_name(j.path, root),
            "status": j.status,
            "head": j.settings.get("head.name", ""),
        }
        base |= {sweep.names[k]: shown_value(k, j.settings.get(k, "")) for k in sweep.shown}
        if not j.runs:
            rows.append(base | {"error": j.reason})
        for r in j.runs:
            rows.append(
                base
                | {"fold": r.fold, "seed": r.seed}
                | {k.replace("/", "_"): r.metrics.get(k, "") for k in (*SHOWN, "test/mse")}
                | {"epochs": len(r.curves.get("train/mae", []))}
                | {"note": "; ".join(n for n in (j.note, r.duplicate and DUPLICATE) if n)}
            )
    return rows


def data_line(groups: list[Group]) -> str:
    """Data: boston, target MEDV ($1000s), 102 test rows; diabetes, ..."""
    seen: dict[str, Group] = {}
    for g in sorted(groups, key=lambda g: g.order):
        seen.setdefault(g.target.dataset, g)
    parts = []
    for name, g in seen.items():
        t = g.target
        unit = t.unit if t.unit else "no unit" if t.recorded else "unit not recorded"
        parts.append(f"{name}, target {t.name} ({unit}), {len(g.runs[0].y_true)} test rows")
    return "Data: " + "; ".join(parts) + "."


def mae_units(groups: list[Group]) -> str:
    if len({g.target.dataset for g in groups}) > 1:
        return "each data set's own target units"
    t = groups[0].target
    if t.unit:
        return t.unit
    return f"units of {t.name}" + (" (no unit)" if t.recorded else "")


# -- entry point ---------------------------------------------------------------------------------
class ReportError(ValueError):
    """Nothing to report on, or nowhere to write it; the message says why and what to pass
    instead."""


def report(root: Path, out: Path | None = None) -> tuple[str, int]:
    """Read root; write summary.csv, summary.md and (given runs) the figures into out.

    Returns the markdown summary and the number of runs it covers. Nothing is written until
    the whole report is read; an out that cannot be written is a ReportError naming it.
    """
    way_out = (
        "pass --out DIR to write the report elsewhere" if out is None else "choose another --out"
    )
    out = out or root
    jobs = [read_runs(p, root) for p in find_jobs(root)]
    if not jobs:
        raise ReportError(
            f"{root}: no job directories found (none holds .hydra/); "
            "pass a sweep directory such as multirun/2024-01-01/12-00-00"
        )
    sweep = group_runs(jobs)
    groups = sweep.groups
    rows = summary_rows(jobs, root, sweep)
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
    if groups:
        text.append(data_line(groups))
    common = sweep.common
    keys = ("scaling", "trainer.max_epochs", "optim.lr", "data.batch_size", "data.num_folds")
    names = short_names([k for k in keys if k in common])
    settings = ", ".join(f"{names[k]}={common[k]}" for k in keys if k in common)
    if settings:
        text.append(f"Common settings: {settings}.")
    if groups:
        single = all(g.estimate("test/mae").n < 2 for g in groups)
        text += [
            "",
            f"MAE in {mae_units(groups)}: mean ± half-width of the 95% confidence interval of "
            f"the mean (Student t over runs; each seed and fold is one run); {NO_CI} where one "
            "run gives no interval.",
            "",
            summary_table(sweep),
            "",
        ]
        if single:
            text += [f"One run per setting: no confidence interval; {MORE_SEEDS}.", ""]
        if len(sweep.shown) == 1:
            name = sweep.names[sweep.shown[0]]
            text += [f"Test MAE by head and {name}:", "", pivot_table(groups), ""]
        text += ["## Verdict", "", *verdict(sweep)]
    if left_out:
        text += ["", "## Left out", ""]
        text += [f"- {summary_name(j.path, root)}: {j.status}: {j.reason}" for j in left_out]
    noted = [j for j in jobs if j.note]
    if noted:
        text += ["", "## Notes", ""]
        text += [f"- {summary_name(j.path, root)}: {j.note}" for j in noted]
    md = "\n".join(text) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
        if groups:
            plot_answer(groups, out / "answer.png")
            plot_mae_by_head(groups, out / "mae_by_head.png")
            plot_pred_vs_true(groups, out / "pred_vs_true.png")
            plot_curves(groups, out / "curves.png")
        (out / "summary.md").write_text(md)
    except OSError as e:  # a read-only sweep directory, a full disk
        raise ReportError(
            f"cannot write to {out} ({e.strerror or type(e).__name__}); {way_out}"
        ) from None
    return md, n_runs


def summary_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else path.name


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m housing_reg.report",
        description="Summarize a sweep (or a directory of sweeps): summary.csv, summary.md, "
        f"{', '.join(FIGURES)} and a verdict.",
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
    print(f"wrote summary.csv, summary.md, {', '.join(FIGURES)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
