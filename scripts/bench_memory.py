"""How honest memory.py's estimate is: each job's peak resident memory, measured, against it.

    python scripts/bench_memory.py [--epochs 1] ['model.replicas=2000' ...]

Each job trains for real in its own process (`python -m housing_reg.train`), and its peak
resident memory (ru_maxrss) less that of the default job (the interpreter, torch, Lightning
and the data, which the estimate leaves out) is set against memory.Fit.needed() for its
settings. Prints a markdown table (docs/faults.md quotes one).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from hydra import compose, initialize_config_module

from housing_reg import memory
from housing_reg.settings import create

JOBS = [
    "model.replicas=2000 data.batch_size=32",
    "model.replicas=10000 data.batch_size=32",
    "model.hidden=[6000,6000] data.batch_size=32",
    "model.replicas=200 model.hidden=[512,512] data.batch_size=64 data.val_fraction=0.2",
]


def peak(overrides: list[str], epochs: int, root: str) -> int:
    """The peak resident bytes of one job, run as a user runs it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "housing_reg.train",
            f"trainer.max_epochs={epochs}",
            "callbacks.progress_bar.refresh_rate=0",
            *overrides,
            f"hydra.run.dir={tempfile.mkdtemp(dir=root)}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, memory.ENV: "off"},  # measure, never refuse
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"error: {' '.join(overrides)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def estimate(overrides: list[str]) -> int:
    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        cfg = compose("config", overrides=["output_dir=unused", *overrides])
    data = create(cfg.data, seeds=[0])
    data.setup("fit")
    shapes = {k: tuple(x.shape) for k, (x, _) in data.splits.items()}
    return memory.fit_of([cfg], [shapes]).needed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("jobs", nargs="*", default=JOBS, help="each job's overrides, as one argument")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        base = peak([], args.epochs, root)
        print(f"default job's peak: {memory.size(base)} (left out of both columns)\n")
        print("| settings | estimate | measured | measured / estimate |")
        print("|---|---|---|---|")
        for job in args.jobs:
            overrides = job.split()
            need = estimate(overrides) - estimate([])
            used = peak(overrides, args.epochs, root) - base
            print(f"| `{job}` | {memory.size(need)} | {memory.size(used)} | {used / need:.2f} |")


if __name__ == "__main__":
    main()
