"""Which jobs can share a fit: the grouping behind fused sweeps.

A job is what the user names and reads (one directory, train.py's `train`); a fit is what
the machine runs. Jobs whose settings differ only in FUSABLE keys train as the replicas of
one fit: each replica keeps its own seed (initial weights, batch order), head, training rows
and target scaler, and its numbers stay exactly those of its lone run (tests/test_fuse.py).
Anything else that differs (lr, batch size, widths, epochs, the data file) needs a fit of its
own. The sweeper groups composed configs with `groups`; the group task splits a group further
into fits with `fits`, once each job's data and checkpoint are known.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from housing_reg.jobdir import BOOKKEEPING

# Fusing these keeps every replica's numbers its lone run's: they only choose what a replica
# starts from and trains on, never how the shared optimizer steps.
FUSABLE = ("seed", "head", "data.fold", "data.target_scaling", "data.target_range")
# Bookkeeping each job keeps for itself (where it writes, how it was (re)started, its logger):
# all of jobdir.BOOKKEEPING but what the fit applies to every job, the first job's callbacks
# and checkpoint cadence.
PER_JOB = tuple(k for k in BOOKKEEPING if k not in ("callbacks", "checkpoint_every"))

T = TypeVar("T")


def fit_key(config: dict[str, Any]) -> str:
    """What must be equal for two jobs to share a fit: the config minus FUSABLE and PER_JOB
    (and the job's own directory wherever a setting names it: the logger's, the trainer's)."""
    text = json.dumps(config, default=str)
    out = json.dumps(str(config.get("output_dir")))[1:-1]
    rest = json.loads(text.replace(out, "<output_dir>") if out else text)
    for key in (*FUSABLE, *PER_JOB):
        *parents, last = key.split(".")
        node = rest
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return json.dumps(rest, sort_keys=True)


def cap(max_replicas: int | None) -> float:
    """fuse.max_replicas as a bound on a fit's models: null is no limit (sweep.check_fuse has
    refused anything but a whole number >= 1 or null)."""
    return math.inf if max_replicas is None else max_replicas


def groups(
    items: Sequence[T], key: Callable[[T], Hashable], size: Callable[[T], int], cap: float
) -> list[list[T]]:
    """items with equal key together, in order of first appearance, each group at most cap
    in total size (an item larger than cap alone)."""
    by_key: dict[Hashable, list[list[T]]] = {}
    filled: dict[Hashable, int] = {}  # the size of each key's last group so far
    for item in items:
        k, n = key(item), size(item)
        runs = by_key.setdefault(k, [[]])
        if runs[-1] and filled[k] + n > cap:
            runs.append([])
            filled[k] = 0
        runs[-1].append(item)
        filled[k] = filled.get(k, 0) + n
    return [g for runs in by_key.values() for g in runs]
