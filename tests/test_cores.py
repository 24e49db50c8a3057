"""The thread rule (cores.py): a fit takes the threads it wants, less the cores other programs
are using, and looks again as it trains. The rule is checked, not a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from housing_reg import cores

STAT = """cpu  400 0 100 900 0 0 0 0 0 0
cpu0 200 0 50 450 0 0 0 0 0 0
cpu1 200 0 50 450 0 0 0 10 0 0
intr 1 2 3
"""


@pytest.mark.unit
def test_busy_seconds_reads_only_this_process_cpus():
    tick = os.sysconf("SC_CLK_TCK")
    assert cores.busy_seconds(STAT, {0, 1}) == pytest.approx((250 + 260) / tick)
    assert cores.busy_seconds(STAT, {1}) == pytest.approx(260 / tick)  # steal counts as busy
    assert cores.busy_seconds(STAT, {7}) is None  # nothing known of CPUs it cannot see


def sample(wall: float, busy: float | None, own: float) -> cores.Sample:
    return cores.Sample(wall, busy, own)


@pytest.mark.unit
def test_others_are_the_busy_time_this_process_did_not_use():
    before = sample(0.0, 10.0, 5.0)
    # 1 s: the CPUs were busy 1.9 s, this process used 1.0 of them: others 0.9 of a core
    assert cores.others(before, sample(1.0, 11.9, 6.0)) == pytest.approx(0.9)
    assert cores.others(before, sample(1.0, 11.0, 6.0)) == 0.0
    assert cores.others(before, sample(1.0, 10.5, 6.0)) == 0.0  # never below 0
    assert cores.others(sample(0.0, None, 5.0), sample(1.0, 11.9, 6.0)) == 0.0  # unknown


@pytest.mark.unit
@pytest.mark.parametrize(
    ("wanted", "cores_", "taken", "expected"),
    [
        (2, 2, 0.0, 2),  # idle: what it wants
        (2, 2, 0.15, 2),  # a shell, a log flush: within the slack
        (2, 2, 0.25, 1),  # part of a core taken: that core is theirs
        (2, 2, 1.0, 1),  # one busy program: one thread
        (2, 2, 2.0, 1),  # both taken: still one, never none
        (8, 16, 3.5, 8),  # a big machine: what it wants, from the 12 free
        (8, 4, 1.0, 3),
        (1, 2, 0.0, 1),  # a lone job's one thread
    ],
)
def test_the_rule(wanted, cores_, taken, expected):
    assert cores.threads(wanted, cores_, taken) == expected


@pytest.mark.unit
def test_a_watch_gives_up_a_core_while_another_program_uses_it(monkeypatch):
    """A fit that wants 2 threads on 2 CPUs: 1 while another program holds a core, 2 again
    once it has gone, each change heard once; between looks nothing is read."""
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(cores, "cpus", lambda: {0, 1})
    monkeypatch.setattr(cores, "sample", lambda: sample(clock["wall"], clock["busy"], clock["own"]))
    monkeypatch.setattr(cores.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(cores._Seen, "last", sample(0.0, 0.0, 0.0))

    def run(seconds: float, ours: float, theirs: float) -> None:
        clock["wall"] += seconds
        clock["own"] += ours * seconds
        clock["busy"] += (ours + theirs) * seconds

    set_to, heard = [], []
    run(5.0, ours=1.0, theirs=1.0)  # start-up beside a busy program
    watch = cores.Watch(2, set_to.append, lambda n, taken: heard.append((n, round(taken, 2))))
    assert watch.current == 1 and set_to == [1] and heard == []
    run(0.1, ours=1.0, theirs=1.0)
    assert watch.check() == 1  # too soon to look again
    run(0.5, ours=1.0, theirs=0.0)  # the other program has ended
    # over the 0.6 s since the last look, others used 0.1 s: within the slack
    assert watch.check() == 2 and set_to == [1, 2] and heard == [(2, 0.17)]
    run(0.5, ours=1.4, theirs=0.6)  # it is back: it gets 0.6 of a core beside our 2 threads
    assert watch.check() == 1 and heard[-1] == (1, 0.6)
    assert watch.changes == 2


@pytest.mark.unit
def test_a_lone_job_wanting_one_thread_never_looks_again(monkeypatch):
    watch = cores.Watch(1, lambda n: None)
    monkeypatch.setattr(cores, "sample", lambda: pytest.fail("looked again"))
    assert watch.check() == 1


@pytest.mark.cli
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_a_real_busy_process_is_seen():
    """A real busy loop beside this process is measured as most of a core taken."""
    before = cores.sample()
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        taken = cores.others(before, cores.sample())
    finally:
        proc.kill()
        proc.wait()
    # Anything else this machine runs only adds to it (pytest-xdist's other worker, say).
    assert taken > 0.5
