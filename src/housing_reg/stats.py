"""Numbers behind the report: Student-t intervals, differences between two settings, and the
summary of a job's training targets that record.py writes into metrics.json.

numpy only (no matplotlib, no scipy), so a training job can import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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


NO_CI = "—"  # what a table shows for a spread or interval that one run cannot have


@dataclass(frozen=True)
class Estimate:
    """Mean of n runs with its sample std and the half-width of its 95% Student-t CI
    (std and half-width are nan for fewer than two runs)."""

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

    @property
    def has_ci(self) -> bool:
        return not math.isnan(self.half)

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.half:.2f}" if self.has_ci else f"{self.mean:.2f}"

    def std_text(self) -> str:
        return f"{self.std:.2f}" if self.has_ci else NO_CI

    def ci_text(self) -> str:
        if not self.has_ci:
            return NO_CI
        return f"{self.mean - self.half:.2f} – {self.mean + self.half:.2f}"


@dataclass(frozen=True)
class Difference:
    """Mean test MAE of b minus a, with the half-width of its 95% CI (nan: too few runs)."""

    mean: float
    half: float
    how: str
    pairs: int = 0  # runs compared one to one (0: unpaired)
    largest: float = math.nan  # paired only: the largest gap in any single run

    @property
    def identical(self) -> bool:
        """Paired, and not one run differs at all."""
        return self.pairs > 0 and self.largest == 0

    @property
    def kind(self) -> str:
        """identical | no CI | clear (b worse) | within noise"""
        if self.identical:
            return "identical"
        if math.isnan(self.half):
            return "no CI"
        return "clear" if self.mean - self.half > 0 else "within noise"


RunKey = tuple  # (fold, seed)


def difference(ta: Mapping[RunKey, float], tb: Mapping[RunKey, float]) -> Difference:
    """b minus a, over runs keyed by (fold, seed). Paired when both ran the same ones (the same
    seed gives the same initial weights and batch order, so only the setting differs); else
    Welch's interval with its degrees of freedom rounded down, which is conservative."""
    if ta.keys() == tb.keys() and ta:
        gaps = [tb[k] - ta[k] for k in ta]
        e = Estimate.of(gaps)
        how = f"paired over {e.n} run{'s' * (e.n != 1)}"
        return Difference(e.mean, e.half, how, e.n, max(map(abs, gaps)))
    ea, eb = Estimate.of(list(ta.values())), Estimate.of(list(tb.values()))
    if ea.n < 2 or eb.n < 2:
        return Difference(eb.mean - ea.mean, math.nan, "too few runs for a CI")
    va, vb = ea.std**2 / ea.n, eb.std**2 / eb.n
    if va + vb == 0:
        return Difference(eb.mean - ea.mean, 0.0, "unpaired, no spread at all")
    df = (va + vb) ** 2 / (va**2 / (ea.n - 1) + vb**2 / (eb.n - 1))
    half = t_quantile(0.95, max(1, math.floor(df))) * math.sqrt(va + vb)
    return Difference(eb.mean - ea.mean, half, f"unpaired (Welch), {ea.n} and {eb.n} runs")


def train_targets(data: Any, bins: int = 30) -> dict[str, Any]:
    """What the report needs about one job's training targets, in the target's own units:
    their summary, a histogram, and the target scaler (a scaled value t means t*scale + shift),
    so it can draw each head's output range against the targets from metrics.json alone.

    data: a RegressionData (its train split, y_scaler and unscale)."""
    y = data.unscale(data.splits["train"][1]).double().numpy().ravel()
    counts, edges = np.histogram(y, bins=bins)
    shift, scale = (float(np.asarray(v)) for v in (data.y_scaler.shift, data.y_scaler.scale))
    return {
        "rows": len(y),
        "mean": _g(y.mean()),
        "min": _g(y.min()),
        "max": _g(y.max()),
        "histogram": {"edges": [_g(e) for e in edges], "counts": counts.tolist()},
        "scaler": {"shift": shift, "scale": scale},
    }


def _g(v: float) -> float:
    return float(f"{float(v):.7g}")
