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
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from housing_reg.report import Estimate, Group, Run, Target, block_verdict, t_quantile

from conftest import FAST, job_dirs, read_metrics, replicas, run_cli

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
    assert (jobs[2] / "evaluate" / "last_on_test_split" / "metrics.json").exists()
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
            for rep in replicas(job):
                runs.setdefault((m["fold"], rep["seed"]), rep["test/mae"])
    values = list(runs.values())
    n, mean, std = len(values), statistics.mean(values), statistics.stdev(values)
    return n, mean, std, T_TABLE[n - 1] * std / n**0.5


def predictions(job: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((job / "predictions.csv").read_text().splitlines()))


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
    assert "unreadable" in others["broken"]
    # Every run's number is the one its job wrote.
    for job in job_dirs(sweeps / "a"):
        if job.name[:2] in ("98", "99"):
            continue
        mine = [r for r in ok if r["job"] == f"a/{job.name}"]
        assert [float(r["test_mae"]) for r in mine] == [p["test/mae"] for p in replicas(job)]
        assert [int(r["seed"]) for r in mine] == [p["seed"] for p in replicas(job)]


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
        for rep in replicas(job):
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


# -- issue 10: the report names no winner that the runs do not support --------------------------
def read_table(md: str) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows."""
    lines = [line for line in md.splitlines() if line.startswith("| head |")]
    start = md.splitlines().index(lines[0])
    body = []
    for line in md.splitlines()[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[0].strip("|").split("|")], body


@pytest.fixture(scope="module")
def one_run_per_head(tmp_path_factory) -> tuple[Path, str]:
    """The default four-head sweep: one run per head, relu and none identical."""
    root = tmp_path_factory.mktemp("heads")
    run_cli("-m", "head=relu,none,sigmoid,tanh", *FAST, f"hydra.sweep.dir={root}", cwd=root)
    run_cli(str(root), module="housing_reg.report", cwd=root)
    return root, (root / "summary.md").read_text()


def test_one_run_per_head_names_no_best_head(one_run_per_head):
    _, md = one_run_per_head
    verdict = md.split("## Verdict")[1]
    assert "Best" not in md
    assert "No best head: one run per head, so no confidence interval" in verdict
    assert "seed='range(10)' or model.replicas=10" in verdict
    header, rows = read_table(md)
    assert header[:6] == ["head", "runs", "test MAE ($1000s)", "std", "95% CI", "train MAE"]
    assert [r[1] for r in rows] == ["1"] * 4
    assert all(r[3] == "—" and r[4] == "—" for r in rows)  # no spread, no CI: a dash
    assert "nan" not in md.lower() and "0.000" not in md


def test_relu_and_none_identical_is_a_tie(one_run_per_head):
    root, md = one_run_per_head
    maes = {read_metrics(j)["head"]: read_metrics(j)["test/mae"] for j in job_dirs(root)}
    assert maes["relu"] == maes["none"]  # positive prices: relu is the identity
    verdict = md.split("## Verdict")[1]
    assert "relu and none tie: identical in every run." in verdict
    assert "relu and none tie: identical test MAE in every run" in verdict
    assert "none worse" not in verdict and "none higher" not in verdict


def test_saturated_heads_sit_at_their_bound_in_target_units(one_run_per_head):
    root, md = one_run_per_head
    mean = statistics.mean(float(r["y_true"]) for r in predictions(job_dirs(root)[0]))
    for head in ("sigmoid", "tanh"):
        assert (
            f"- {head}: every test prediction sits at 1.00 ({head}'s upper bound), "
            f"{mean - 1:.2f} below the mean test target {mean:.2f} ($1000s); "
            "1 of 1 runs predicts one price for every house."
        ) in md


def test_figures_are_one_size_and_readable(one_run_per_head):
    root, _ = one_run_per_head
    sizes = {}
    for name in FIGURES:
        pixels = matplotlib.image.imread(root / name)
        sizes[name] = pixels.shape[:2]
        assert pixels.shape[0] >= 450 and pixels.shape[1] >= 800, name
    assert sizes["curves.png"] == sizes["mae_by_head.png"]  # no longer a 320 px thumbnail


def test_mae_axis_is_linear_and_means_are_written_out(tmp_path: Path):
    from matplotlib.figure import Figure

    from housing_reg import figures

    runs = [fake_group(h, [m]) for h, m in (("relu", 3.34), ("sigmoid", 22.08))]
    captured = {}
    save = figures.save
    figures.save = lambda fig, path: captured.setdefault("fig", fig)
    try:
        figures.plot_mae_by_head(runs, tmp_path / "x.png")
    finally:
        figures.save = save
    fig: Figure = captured["fig"]
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert {"3.34", "22.08"} <= {t.get_text() for t in ax.texts}


def fake_group(head: str, maes: list[float], order: int = 0, pred: float = 20.0) -> Group:
    y = [10.0, 20.0, 30.0]
    runs = [
        Run("job", None, seed, {"test/mae": m}, {}, np.array(y), np.array([pred, pred + 5, 25]),
            scaler=(0.0, 1.0))
        for seed, m in enumerate(maes)
    ]  # fmt: skip
    return Group(head, (), runs, Target("boston", "MEDV", "$1000s", True), order=order)


def test_best_only_when_clearly_ahead_of_every_other():
    same = [3.1, 3.3, 2.9, 3.0]
    tied = block_verdict([fake_group("relu", same), fake_group("none", same, 1)], ())
    assert tied[0].startswith("No best head: relu and none tie for the lowest test MAE")
    assert "none identical to relu in every run" in tied[0]
    noisy = [fake_group("none", same), fake_group("relu", [3.2, 3.1, 3.1, 3.0], 1)]
    assert "within noise of none (95% CI of the difference" in block_verdict(noisy, ())[0]
    clear = [fake_group("none", same), fake_group("sigmoid", [22.1, 22.0, 22.2, 22.1], 1)]
    assert block_verdict(clear, ())[0].startswith("Best: none, test MAE 3.08 ± ")


# -- issue 12: names and units come from the data ------------------------------------------------
def test_csv_without_unit_gets_no_boston_words(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (150, 3))
    score = 40 + 30 * x[:, 0] - 10 * x[:, 1] + rng.normal(0, 1, 150)
    lines = ["a,b,c,score"] + [
        f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{s:.3f}" for r, s in zip(x, score, strict=True)
    ]
    (tmp_path / "lab.csv").write_text("\n".join(lines) + "\n")
    sweep = tmp_path / "sweep"
    run_cli("-m", "head=none,sigmoid", f"data.path={tmp_path / 'lab.csv'}", "data.target=score",
            "model.replicas=2", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    m = read_metrics(job_dirs(sweep)[0])
    assert m["dataset"] == "lab" and m["target"] == {"name": "score", "unit": ""}
    md = run_cli(str(sweep), module="housing_reg.report", cwd=tmp_path).stdout
    assert md.startswith("# Sweep report") and (sweep / "summary.md").read_text() in md
    for word in ("$1000s", "price", "house"):
        assert word not in md.lower()
    assert "Data: lab, target score (no unit)" in md
    assert "runs predict one value for every row" in md  # sigmoid, stuck at 1


def test_scaling_sweep_has_a_scaling_column_and_compares_scalings(tmp_path: Path):
    sweep = run_cli("-m", "head=sigmoid", "data.target_scaling=none,minmax", "model.replicas=2",
                    *FAST, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    # The sweep's own table: a column for what varied, by its short name, and no job names.
    table = sweep.stdout[sweep.stdout.index("target_scaling ") :].splitlines()
    assert table[0].split() == ["target_scaling", "train", "MAE", "test", "MAE"]
    assert [row.split()[0] for row in table[1:3]] == ["none", "minmax"]
    md = run_cli(str(tmp_path), module="housing_reg.report", cwd=tmp_path).stdout
    header, rows = read_table(md)
    assert header[:3] == ["head", "scaling", "runs"]
    assert sorted(r[1] for r in rows) == ["minmax[0,1]", "none"]
    # Only the scaling varies, so the verdict compares scalings, not heads.
    assert "Best: sigmoid (minmax[0,1] targets), test MAE" in md
    assert "clearly ahead of sigmoid (unscaled targets)" in md


def test_diabetes_fails_and_is_fixed_the_same_way(tmp_path: Path):
    """One command shows the failure on a second real data set, and target scaling its fix."""
    run_cli("-m", "data=diabetes", "head=none,sigmoid", "data.target_scaling=none,minmax",
            "model.replicas=2", *FAST, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    mae = {}
    for job in job_dirs(tmp_path):
        m = read_metrics(job)
        assert m["dataset"] == "diabetes" and m["target"] == {"name": "progression", "unit": ""}
        mae[m["head"], m["target_scaling"]] = m["test/mae"]
        if (m["head"], m["target_scaling"]) == ("sigmoid", "none"):
            rows = predictions(job)
            mean = statistics.mean(float(r["y_true"]) for r in rows)
            assert all(abs(float(r["y_pred"]) - 1) < 1e-4 for r in rows)  # stuck at its bound
    assert 150 < mae["sigmoid", "none"] == pytest.approx(mean - 1, abs=0.01)
    assert mae["sigmoid", "minmax"] < mae["sigmoid", "none"] / 2  # the fix
    md = run_cli(str(tmp_path), module="housing_reg.report", cwd=tmp_path).stdout
    assert f"sits at 1.00 (sigmoid's upper bound), {mean - 1:.2f} below the mean test target" in md
    for word in ("$1000s", "price", "house"):
        assert word not in md.lower()


def test_two_data_sets_are_never_compared_with_each_other(tmp_path: Path):
    run_cli("-m", "data=boston,diabetes", "head=none,sigmoid", "model.replicas=2", *FAST,
            f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    md = run_cli(str(tmp_path), module="housing_reg.report", cwd=tmp_path).stdout
    header, rows = read_table(md)
    assert header[:3] == ["head", "data", "runs"]  # the target goes with the data set
    assert [r[1] for r in rows] == ["boston", "boston", "diabetes", "diabetes"]
    boston, diabetes = md.split("- **boston** (MEDV, $1000s):")[1].split("- **diabetes**")
    assert "one price for every house" in boston and "($1000s)" in boston
    assert "one value for every row" in diabetes
    for word in ("$1000s", "price", "house", "boston"):
        assert word not in diabetes
