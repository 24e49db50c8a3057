"""The report on real sweeps: the files it writes, its numbers against a hand computation,
and job directories that failed, are still being written, or are broken."""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from housing_reg.report import Estimate, t_quantile

from conftest import FAST, job_dirs, read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("answer.png", "mae_by_head.png", "pred_vs_true.png", "curves.png")
# Two-sided 95% points of Student's t from a printed table (e.g. NIST/SEMATECH 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> Path:
    """A directory of two real sweeps plus a half-written and a broken job directory.

    Sweep a: relu and sigmoid, 2 folds, jobs with seed 0 and 1 of 2 replicas each, so seed 1
    is trained twice (replica 1 of the seed-0 job and replica 0 of the seed-1 job).
    Sweep b: one job that fails its config check.
    """
    root = tmp_path_factory.mktemp("sweeps")
    sweep = ["model.replicas=2", "data.num_folds=2", "data.fold=0,1", *FAST]
    run_cli(
        "-m", "head=relu,sigmoid", "seed=0,1", *sweep, f"hydra.sweep.dir={root / 'a'}", cwd=root
    )
    failed = run_cli(
        "-m", "head=none", "optim.lr=-1", *FAST, f"hydra.sweep.dir={root / 'b'}",
        cwd=root, check=False,
    )  # fmt: skip
    assert failed.returncode != 0 and "ConfigError" in failed.stderr
    jobs = job_dirs(root / "a")
    assert len(jobs) == 8
    # An evaluation inside a job writes metrics.json of its own: not a job, not a failure.
    run_cli(f"ckpt_path={jobs[2] / 'checkpoints' / 'last.ckpt'}", module="housing_reg.evaluate",
            cwd=root)  # fmt: skip
    assert (jobs[2] / "evaluate" / "test" / "metrics.json").exists()
    half = root / "a" / "98_still_running"
    shutil.copytree(jobs[0], half)
    (half / "metrics.json").unlink()
    broken = root / "a" / "99_broken"
    shutil.copytree(jobs[1], broken)
    text = (broken / "metrics.json").read_text()
    (broken / "metrics.json").write_text(text[: len(text) // 2])
    return root


@pytest.fixture(scope="module")
def reported(sweeps: Path):
    proc = run_cli(str(sweeps), module="housing_reg.report", cwd=sweeps)
    return proc, (sweeps / "summary.md").read_text()


def hand_estimate(jobs: list[Path], head: str) -> tuple[int, float, float, float]:
    """n, mean, std and CI half-width of test MAE from metrics.json, each (fold, seed) once."""
    runs = {}
    for job in jobs:
        m = read_metrics(job)
        if m["head"] == head:
            for rep in m["per_replica"]:
                runs.setdefault((m["fold"], rep["seed"]), rep["test/mae"])
    values = list(runs.values())
    n, mean, std = len(values), statistics.mean(values), statistics.stdev(values)
    return n, mean, std, T_TABLE[n - 1] * std / n**0.5


def table_row(md: str, head: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(f"| {head} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_t_quantiles_match_the_printed_table():
    for df, t in T_TABLE.items():
        assert t_quantile(0.95, df) == pytest.approx(t, abs=6e-4)
    assert t_quantile(0.95, 10_000) == pytest.approx(1.960, abs=1e-3)  # the normal's 1.96


def test_confidence_interval_of_a_textbook_sample():
    # mean 5, sample variance 32/7, t(7) = 2.365: half-width 2.365 * sqrt(32/7) / sqrt(8).
    e = Estimate.of([2, 4, 4, 4, 5, 5, 7, 9])
    assert (e.n, e.mean) == (8, 5.0)
    assert e.std == pytest.approx((32 / 7) ** 0.5)
    assert e.half == pytest.approx(2.3646 * (32 / 7) ** 0.5 / 8**0.5, rel=1e-4)
    assert str(e) == "5.00 ± 1.79"


def test_report_writes_tables_and_figures(sweeps: Path, reported):
    proc, md = reported
    assert "| relu |" in proc.stdout and "## Verdict" in proc.stdout  # printed, too
    for name in FIGURES:
        pixels = matplotlib.image.imread(sweeps / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    with open(sweeps / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 16  # 8 jobs x 2 replicas, duplicates listed
    assert sum(r["note"] == "duplicate, counted once" for r in ok) == 4
    others = {r["status"]: r["error"] for r in rows if r["status"] != "ok"}
    assert sorted(r["status"] for r in rows if r["status"] != "ok") == sorted(others)
    assert set(others) == {"failed", "incomplete", "broken"}  # and the evaluation is no job
    assert "ConfigError" in others["failed"] and "optim.lr" in others["failed"]
    assert "no metrics.json" in others["incomplete"]
    assert "JSONDecodeError" in others["broken"]
    # Every run's number is the one its job wrote.
    for job in job_dirs(sweeps / "a"):
        if job.name[:2] in ("98", "99"):
            continue
        m = read_metrics(job)
        mine = [r for r in ok if r["job"] == f"a/{job.name}"]
        assert [float(r["test_mae"]) for r in mine] == [p["test/mae"] for p in m["per_replica"]]
        assert [int(r["seed"]) for r in mine] == [p["seed"] for p in m["per_replica"]]


def test_summary_numbers_match_a_hand_computation(sweeps: Path, reported):
    _, md = reported
    jobs = [j for j in job_dirs(sweeps / "a") if j.name[:2] not in ("98", "99")]
    for head in ("relu", "sigmoid"):
        n, mean, std, half = hand_estimate(jobs, head)
        assert n == 6  # seeds 0, 1, 2 x folds 0, 1
        cells = table_row(md, head)
        assert cells[1:4] == [str(n), f"**{mean:.2f} ± {half:.2f}**", f"{std:.2f}"]
        assert cells[4] == f"{mean - half:.2f} – {mean + half:.2f}"
    assert "4 duplicate run(s)" in md


def test_duplicate_runs_across_jobs_agree_so_the_report_counts_them_once(sweeps: Path):
    """Replica 1 of the seed-0 job is the seed-1 run that the seed-1 job trains too."""
    by_seed = {}
    for job in job_dirs(sweeps / "a")[:8]:
        m = read_metrics(job)
        for rep in m["per_replica"]:
            by_seed.setdefault((m["head"], m["fold"], rep["seed"]), []).append(rep["test/mae"])
    twice = {k: v for k, v in by_seed.items() if len(v) == 2}
    assert len(twice) == 4 and all(k[2] == 1 for k in twice)
    for a, b in twice.values():
        assert a == pytest.approx(b, rel=1e-5)


def test_verdict_and_left_out_jobs(reported):
    _, md = reported
    verdict = md.split("## Verdict")[1]
    assert "Best: relu, test MAE" in verdict and "clearly ahead of sigmoid by" in verdict
    assert "sigmoid: every test prediction sits at 1.00 (sigmoid's upper bound)" in verdict
    left_out = md.split("## Left out")[1]
    assert "b/0_" in left_out and "failed: ConfigError" in left_out
    assert "a/98_still_running: incomplete" in left_out
    assert "a/99_broken: broken" in left_out


def test_pred_vs_true_figure_is_in_tensorboard_images(sweeps: Path):
    job = job_dirs(sweeps / "a")[0]
    images = []
    for f in job.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        if "test/pred_vs_true" in acc.Tags()["images"]:
            images += acc.Images("test/pred_vs_true")
    assert len(images) == 1
    png = matplotlib.image.imread(io.BytesIO(images[0].encoded_image_string), format="png")
    assert png.shape[:2] == (images[0].height, images[0].width) and images[0].width > 200


def test_sweep_with_no_finished_job_says_so(sweeps: Path, tmp_path: Path):
    shutil.copytree(sweeps / "a" / "98_still_running", tmp_path / "0_running")
    proc = run_cli(str(tmp_path), module="housing_reg.report", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no finished runs yet" in proc.stderr
    assert "0_running: incomplete" in proc.stdout
    assert "0_running: incomplete" in (tmp_path / "summary.md").read_text()


def test_bad_directory_is_a_one_line_error(tmp_path: Path):
    for target, message in ((tmp_path / "nope", "no such directory"), (tmp_path, "no job dir")):
        proc = run_cli(str(target), module="housing_reg.report", cwd=tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert proc.stderr.strip().count("\n") == 0


def test_script_writes_elsewhere_with_out(sweeps: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(sweeps / "a"), "--out",
         str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| relu |" in proc.stdout
    assert all((tmp_path / "r" / name).exists() for name in (*FIGURES, "summary.md"))
    assert not (sweeps / "a" / "summary.md").exists()  # --out leaves the sweep alone
