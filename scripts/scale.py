"""Memory and time at scale: a large CSV, many replicas, one epoch (issue #18's case).

    python scripts/scale.py [--rows 1000000] [--replicas 100] [--out scale.json]

Writes a synthetic CSV (13 features and a target, `rows` rows) to a temporary directory, then
runs what a user types, each as its own process, and reports each one's wall seconds and peak
resident memory (the kernel's ru_maxrss of the child):
  train     python -m housing_reg.train data.path=... data.batch_size=1024 model.replicas=R
            trainer.max_epochs=1
  evaluate  on the job's own test split, then on the whole file
  report    python -m housing_reg.report on the job
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """13 standard-normal features and a linear target with noise, around 22 like MEDV."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 13))
    y = 22 + x @ rng.uniform(-3, 3, 13) + rng.standard_normal(rows)
    header = ",".join([*(f"x{i}" for i in range(13)), "y"])
    np.savetxt(path, np.column_stack([x, y]), fmt="%.6g", delimiter=",", header=header, comments="")


def measure(name: str, args: list[str], cwd: Path) -> dict[str, float | str]:
    """Run `python -m args` in its own wrapper process, which reports its child's peak RSS."""
    wrapper = (
        "import resource, subprocess, sys;"
        "rc = subprocess.run(sys.argv[1:]).returncode;"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    last = out.stdout.strip().splitlines()[-1].split()
    kib, rc = int(last[0]), int(last[1])
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}):\n{out.stderr[-3000:]}")
    row = {"step": name, "wall_s": round(wall, 1), "peak_rss_gb": round(kib / 2**20, 2)}
    print(f"{name:<26} {row['wall_s']:>8.1f} s {row['peak_rss_gb']:>8.2f} GB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >= 0
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        csv = cwd / "big.csv"
        write_csv(csv, args.rows)
        print(f"{args.rows:,} rows x 14 columns, {args.replicas} replicas; {platform.node()}")
        print(f"{'step':<26} {'wall':>10} {'peak RSS':>11}")
        job = cwd / "job"
        common = ["callbacks.progress_bar.refresh_rate=0"]
        rows = [
            measure(
                "train (1 epoch)",
                [
                    "housing_reg.train",
                    f"data.path={csv}",
                    "data.target=y",
                    "data.batch_size=1024",
                    f"model.replicas={args.replicas}",
                    "trainer.max_epochs=1",
                    f"hydra.run.dir={job}",
                    *common,
                ],
                cwd,
            ),
            measure(
                "evaluate (test split)",
                ["housing_reg.evaluate", f"ckpt_path={job}/checkpoints/last.ckpt"],
                cwd,
            ),
            measure(
                "evaluate (whole file)",
                [
                    "housing_reg.evaluate",
                    f"ckpt_path={job}/checkpoints/last.ckpt",
                    f"data.path={csv}",
                ],
                cwd,
            ),
            measure("report", ["housing_reg.report", str(job)], cwd),
        ]
        metrics = json.loads((job / "metrics.json").read_text())
        print(f"train: fit {metrics['fit_seconds']:.1f} s for {metrics['steps']} steps")
        rows[0]["fit_s"] = round(metrics["fit_seconds"], 1)
    if args.out:
        result = {"rows": args.rows, "replicas": args.replicas, "results": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
