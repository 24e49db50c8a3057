"""CSV loading speed and memory: housing_reg.csvfile.load_csv against np.loadtxt, in one run.

    python scripts/bench_csv.py [--rows 1000000] [--repeats 3] [--exact] [--text-column]
                                [--out bench_csv.json]

Writes a numeric CSV (a header and --rows rows of 14 columns, ~112 bytes a row) to a temporary
directory, then loads it in a fresh subprocess per measurement, so every method starts from the
same imports and no method inherits another's memory:

* time: wall seconds of the load call alone, the median and the best of --repeats runs,
  interleaved (on a shared machine the best is the steadier figure); and the growth of the
  process's peak resident set (ru_maxrss) over the call, the median;
* memory: the tracemalloc peak during the call (numpy reports its arrays to tracemalloc), in
  a run of its own, as tracemalloc slows pure-Python code and its bookkeeping takes memory.

Memory is in MB (10**6 bytes) and as a multiple of the file's size.

Ratios are to np.loadtxt(path, delimiter=",", skiprows=1) in the same run. --exact adds
load_csv with its fast path switched off: the exact, cell-by-cell path that finds the line and
column of a bad cell, and that reads the files the fast path leaves to it. --text-column adds
a 15th column of words that load_csv leaves out (data.features names the 13 others) and
np.loadtxt skips with usecols.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = [f"X{i}" for i in range(13)] + ["MEDV"]
METHODS = ("np.loadtxt", "load_csv", "load_csv exact path")


def write_csv(path: Path, rows: int, seed: int = 0, text: bool = False) -> None:
    """rows x 14 values in [0, 1000) with 3 decimals, like '636.962' (8 bytes a cell); text:
    and a last column of words, like 'north'."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(["north", "south", "east", "west"])
    with open(path, "w") as f:
        f.write(",".join(COLUMNS + ["side"] * text) + "\n")
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            block = np.round(rng.uniform(0, 1000, (n, 14)), 3)
            if not text:
                np.savetxt(f, block, fmt="%.6g", delimiter=",")
                continue
            cells = np.char.mod("%.6g", block)
            side = words[rng.integers(0, len(words), n)][:, None]
            np.savetxt(f, np.concatenate([cells, side], axis=1), fmt="%s", delimiter=",")


def rss_mb() -> float:
    """Current resident set (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes, or KiB


def child(method: str, path: str, mode: str) -> dict:
    """One load in this process; what it cost."""
    import tracemalloc

    import numpy as np

    from housing_reg import csvfile

    with open(path) as f:  # --text-column: the words are not for np.loadtxt
        usecols = range(len(COLUMNS)) if f.readline().rstrip().endswith(",side") else None
    if method == "np.loadtxt":

        def load():
            return np.loadtxt(path, delimiter=",", skiprows=1, usecols=usecols)

    else:
        if method == "load_csv exact path":
            csvfile._fast_body = lambda *args: None  # every file takes the exact path
        features = COLUMNS[:-1]

        def load():
            table = csvfile.load_csv(path, "MEDV", features)
            assert table.x.shape[1] == 13
            return table

    if mode == "memory":
        tracemalloc.start()
        load()
        return {"tracemalloc_mb": tracemalloc.get_traced_memory()[1] / 1e6}
    rss_before = rss_mb()
    start = time.perf_counter()
    load()
    return {"seconds": time.perf_counter() - start, "rss_growth_mb": peak_rss_mb() - rss_before}


def run_child(method: str, path: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exact", action="store_true", help="also time the exact (slow) path")
    ap.add_argument("--text-column", action="store_true", help="add a column load_csv leaves out")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    methods = list(METHODS if args.exact else METHODS[:2])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.csv"
        write_csv(path, args.rows, text=args.text_column)
        size_mb = path.stat().st_size / 1e6
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.repeats):  # interleaved, so drift hits every method alike
            for m in methods:
                runs[m].append(run_child(m, path, "time"))
        memory = {m: run_child(m, path, "memory")["tracemalloc_mb"] for m in methods}
    seconds = {m: statistics.median(r["seconds"] for r in runs[m]) for m in methods}
    best = {m: min(r["seconds"] for r in runs[m]) for m in methods}
    rss = {m: statistics.median(r["rss_growth_mb"] for r in runs[m]) for m in methods}
    results = {
        m: {
            "seconds": seconds[m],
            "time_ratio": seconds[m] / seconds["np.loadtxt"],
            "best_seconds": best[m],
            "best_ratio": best[m] / best["np.loadtxt"],
            "rss_growth_mb": rss[m],
            "rss_growth_x_file": rss[m] / size_mb,
            "tracemalloc_mb": memory[m],
            "tracemalloc_x_file": memory[m] / size_mb,
            "all_seconds": [r["seconds"] for r in runs[m]],
        }
        for m in methods
    }
    columns = len(COLUMNS) + args.text_column
    print(
        f"{args.rows} rows x {columns} columns, {size_mb:.0f} MB; median of "
        f"{args.repeats}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'method':20} {'median s':>8} {'x loadtxt':>9} {'best s':>6} {'x loadtxt':>9} "
        f"{'RSS+ MB':>7} {'x file':>6} {'traced MB':>9} {'x file':>6}"
    )
    for m, r in results.items():
        print(
            f"{m:20} {r['seconds']:8.2f} {r['time_ratio']:9.2f} {r['best_seconds']:6.2f} "
            f"{r['best_ratio']:9.2f} {r['rss_growth_mb']:7.0f} {r['rss_growth_x_file']:6.2f} "
            f"{r['tracemalloc_mb']:9.0f} {r['tracemalloc_x_file']:6.2f}"
        )
    if args.out:
        figures = {"rows": args.rows, "file_mb": size_mb, **results}
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
