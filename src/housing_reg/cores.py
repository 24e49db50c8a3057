"""How many torch threads a fit trains on: the cores it would gain from, less the cores other
programs are using right now.

A fit's steps are small (a batch of one row), so torch enters its thread pool's parallel
region many times a step, and each time every thread of the pool must arrive. A thread whose
core another program holds arrives only when the scheduler gives it a turn: with one busy
process beside it, a fit of four models on two threads took 9.4-10.2 s where one thread took
2.4-2.6 s (docs/speed.md). So a fit takes a second thread only while no other program is
using that core, and looks again as it trains: other programs come and go.

"Other programs" is measured, not guessed: over the last interval, the busy time of the CPUs
this process may run on (/proc/stat) less this process's own CPU time. It reads nothing but
/proc and imports nothing heavy; `sample()` runs when the package is imported, so a fit's
first decision covers everything since the process started (imports take seconds).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STAT = Path("/proc/stat")
# A core counts as taken once other programs used more than this share of one over the last
# interval: a shell prompt or a log flush is not a reason to leave a core idle.
SLACK = 0.2
INTERVAL = 0.25  # seconds between looks while a fit trains


@dataclass(frozen=True)
class Sample:
    """When, how busy this process's CPUs were (seconds, summed over them), and how much of
    that was this process's own work (its children's included: forked image workers)."""

    wall: float
    busy: float | None  # None where /proc/stat cannot be read: nothing is known of others
    own: float


def cpus() -> set[int]:
    """The CPUs this process may run on (a Slurm task's, a container's), else all."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def busy_seconds(stat: str, which: set[int]) -> float | None:
    """Seconds the CPUs in `which` spent on anything but idling, from /proc/stat's text: user,
    nice, system, irq, softirq and steal (a hypervisor lending the core to another guest)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, seen = 0, 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in which:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        total += user + nice + system + irq + softirq + steal
        seen += 1
    return total / tick if seen else None


def sample() -> Sample:
    try:
        busy = busy_seconds(STAT.read_text(), cpus())
    except (OSError, ValueError):
        busy = None
    t = os.times()  # this process's threads, and its children once they have ended
    return Sample(time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system)


def others(before: Sample, after: Sample) -> float:
    """Cores' worth of CPU that other programs used between two samples (0 where unknown)."""
    wall = after.wall - before.wall
    if before.busy is None or after.busy is None or wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


def free(cores: int, taken: float) -> int:
    """The cores a fit may use when other programs use `taken` cores' worth of them: each core
    they use more than SLACK of counts as theirs; at least one is always ours."""
    return max(1, cores - math.ceil(taken - SLACK))


def threads(wanted: int, cores: int, taken: float) -> int:
    """The rule: the threads a fit wants (train.py: its jobs' `threads`, more only where it
    gains and stays exact), but no more than the cores other programs leave free."""
    return max(1, min(wanted, free(cores, taken)))


class _Seen:
    """What this process last measured: the sample a window starts from, and the cores other
    programs were using over the last window long enough to judge (MIN_WINDOW)."""

    last = sample()  # at import: the first decision covers the process's start-up
    taken = 0.0


MIN_WINDOW = 0.1  # seconds: /proc/stat counts in ticks of 10 ms per CPU


def taken_now() -> float:
    """Cores' worth of CPU other programs have used since the last look (or, if that was a
    moment ago, over the window before it)."""
    now = sample()
    if now.wall - _Seen.last.wall >= MIN_WINDOW:
        _Seen.taken = others(_Seen.last, now)
        _Seen.last = now
    return _Seen.taken


class Watch:
    """The threads of one fit, looked at again every INTERVAL seconds while it trains
    (`check`, called once per block of steps; reading /proc/stat takes about 50 us).
    set_threads(n) applies a decision; on_change(n, taken) hears of each later change."""

    def __init__(
        self,
        wanted: int,
        set_threads: Callable[[int], None],
        on_change: Callable[[int, float], None] | None = None,
    ):
        self.wanted, self.set_threads, self.on_change = wanted, set_threads, on_change
        self.cores = len(cpus())
        self.current = threads(wanted, self.cores, taken_now())
        self.changes = 0
        self.set_threads(self.current)

    def check(self) -> int:
        if self.wanted == 1 or time.monotonic() - _Seen.last.wall < INTERVAL:
            return self.current
        taken = taken_now()
        n = threads(self.wanted, self.cores, taken)
        if n != self.current:
            self.current = n
            self.changes += 1
            self.set_threads(n)
            if self.on_change is not None:
                self.on_change(n, taken)
        return n
