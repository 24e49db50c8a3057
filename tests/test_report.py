"""The report: the files it writes, its numbers against a hand computation, its verdict, and
job directories that failed, are still being written, or are broken.

Its text and tables are checked on job directories the tests write (conftest.write_job: the
files record.py writes, with test predictions each test chooses), in-process through
report.report and report.main, what `python -m housing_reg.report` runs. One test ties the
report to real training: the README's sweep (conftest.readme_sweep), reported by the real
command line; and the diabetes test trains its jobs."""

from __future__ import annotations

import contextlib
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
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from housing_reg.evaluate import evaluate
from housing_reg.report import Estimate, Group, Run, Target, block_verdict, report, t_quantile
from housing_reg.report import main as report_main
from housing_reg.runs import record_failure
from housing_reg.settings import ConfigError
from housing_reg.sweep import summarize
from housing_reg.train import train, train_jobs

from conftest import FAST, compose_cfg, job_dirs, read_metrics, replicas, run_cli, write_job

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("answer.png", "mae_by_head.png", "pred_vs_true.png", "curves.png")
# Two-sided 95% points of Student's t from a printed table (e.g. NIST/SEMATECH 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042}


# -- test predictions a job directory is written with -------------------------------------------
def off_by(mae: float):
    """Predictions mae away from every target (alternately above and below), a little more
    for each seed: the run's test MAE is mae + 0.1 * seed exactly."""

    def predict(y: np.ndarray, seed: int) -> np.ndarray:
        return y + np.where(np.arange(len(y)) % 2, 1.0, -1.0) * (mae + 0.1 * seed)

    return predict


def stuck_at(value: float):
    """One prediction for every row: a saturated head."""
    return lambda y, seed: np.full(len(y), value)


def sweep_job(sweep: Path, num: int, *overrides: str, predict) -> Path:
    """A job directory named as a sweep names it (NUM_key=value,...)."""
    shown = ",".join(o for o in overrides if not o.startswith("callbacks."))
    job = sweep / f"{num}_{shown.replace('/', '_')}"
    write_job(job, *overrides, predict=predict)
    return job


def refused_job(job: Path, *overrides: str) -> None:
    """A job whose settings train.train refuses, recorded as the command line records it."""
    cfg = compose_cfg(*overrides, output_dir=job)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    (job / ".hydra").mkdir(parents=True)
    record_failure(cfg, "failed", e.value)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> Path:
    """A directory of two sweeps plus a half-written and a broken job directory.

    Sweep a: relu and sigmoid (stuck at 1), 2 folds, jobs with seed 0 and 1 of 2 replicas
    each, so seed 1 is there twice (replica 1 of the seed-0 job and replica 0 of the seed-1
    job), with the same numbers (as training gives them: test_replicas.py).
    Sweep b: one job that fails its config check.
    """
    root = tmp_path_factory.mktemp("sweeps")
    num = 0
    for head in ("relu", "sigmoid"):
        for seed in (0, 1):
            for fold in (0, 1):
                predict = off_by(3.0 + 0.2 * fold) if head == "relu" else stuck_at(1.0)
                settings = (f"head={head}", f"seed={seed}", "model.replicas=2")
                folds = ("data.num_folds=2", f"data.fold={fold}", *FAST)
                sweep_job(root / "a", num, *settings, *folds, predict=predict)
                num += 1
    refused_job(root / "b" / "0_head=none,optim.lr=-1", "head=none", "optim.lr=-1", *FAST)
    jobs = job_dirs(root / "a")
    assert len(jobs) == 8
    half = root / "a" / "98_still_running"
    shutil.copytree(jobs[0], half)
    (half / "metrics.json").unlink()
    broken = root / "a" / "99_broken"
    shutil.copytree(jobs[1], broken)
    text = (broken / "metrics.json").read_text()
    (broken / "metrics.json").write_text(text[: len(text) // 2])
    return root


@pytest.fixture(scope="module")
def reported(sweeps: Path) -> tuple[int, str, str]:
    """`python -m housing_reg.report SWEEPS`, as report.main runs it: its exit status, what it
    printed, and summary.md."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = report_main([str(sweeps)])
    return status, printed.getvalue(), (sweeps / "summary.md").read_text()


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


def figure_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    return {name: matplotlib.image.imread(folder / name).shape[:2] for name in FIGURES}


@pytest.mark.unit
def test_t_quantiles_match_the_printed_table():
    for df, t in T_TABLE.items():
        assert t_quantile(0.95, df) == pytest.approx(t, abs=6e-4)
    assert t_quantile(0.95, 10_000) == pytest.approx(1.960, abs=1e-3)  # the normal's 1.96


@pytest.mark.unit
def test_confidence_interval_of_a_textbook_sample():
    # mean 5, sample variance 32/7, t(7) = 2.365: half-width 2.365 * sqrt(32/7) / sqrt(8).
    e = Estimate.of([2, 4, 4, 4, 5, 5, 7, 9])
    assert (e.n, e.mean) == (8, 5.0)
    assert e.std == pytest.approx((32 / 7) ** 0.5)
    assert e.half == pytest.approx(2.3646 * (32 / 7) ** 0.5 / 8**0.5, rel=1e-4)
    assert str(e) == "5.00 ± 1.79"


@pytest.mark.unit
def test_report_writes_tables_and_figures(sweeps: Path, reported):
    status, out, md = reported
    assert status == 0
    assert md in out and "| relu |" in md and "## Verdict" in md  # printed, too
    assert "12 runs from 8 finished job(s); 3 job(s) left out" in md  # 4 duplicates of 16
    assert f"wrote summary.csv, summary.md, {', '.join(FIGURES)} to {sweeps}" in out
    for name, (height, width) in figure_sizes(sweeps).items():
        assert height > 200 and width > 300, name
    with open(sweeps / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 16  # 8 jobs x 2 replicas, duplicates listed
    assert sum(r["note"] == "duplicate, counted once" for r in ok) == 4
    others = {r["status"]: r["error"] for r in rows if r["status"] != "ok"}
    assert sorted(r["status"] for r in rows if r["status"] != "ok") == sorted(others)
    assert set(others) == {"failed", "incomplete", "broken"}
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
        assert {r["fold"] for r in mine} == {str(read_metrics(job)["fold"])}


@pytest.mark.unit
def test_summary_numbers_match_a_hand_computation(sweeps: Path, reported):
    md = reported[2]
    jobs = [j for j in job_dirs(sweeps / "a") if j.name[:2] not in ("98", "99")]
    for head in ("relu", "sigmoid"):
        n, mean, std, half = hand_estimate(jobs, head)
        assert n == 6  # seeds 0, 1, 2 x folds 0, 1
        cells = table_row(md, head)
        assert cells[1:4] == [str(n), f"**{mean:.2f} ± {half:.2f}**", f"{std:.2f}"]
        assert cells[4] == f"{mean - half:.2f} – {mean + half:.2f}"
    assert "4 duplicate run(s)" in md
    assert "Data: boston, target MEDV ($1000s), 102 test rows." in md


@pytest.mark.unit
def test_verdict_and_left_out_jobs(reported):
    md = reported[2]
    verdict = md.split("## Verdict")[1]
    assert "Best: relu, test MAE" in verdict and "clearly ahead of sigmoid by" in verdict
    assert "sigmoid: every test prediction sits at 1.00 (sigmoid's upper bound)" in verdict
    left_out = md.split("## Left out")[1]
    assert "b/0_" in left_out and "failed: ConfigError" in left_out
    assert "a/98_still_running: incomplete" in left_out
    assert "a/99_broken: broken" in left_out


@pytest.mark.unit
def test_sweep_with_no_finished_job_says_so(sweeps: Path, tmp_path: Path, capsys):
    shutil.copytree(sweeps / "a" / "98_still_running", tmp_path / "0_running")
    assert report_main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0 and "no finished runs yet" in err
    assert "0_running: incomplete" in out
    assert "0_running: incomplete" in (tmp_path / "summary.md").read_text()


@pytest.mark.unit
def test_a_directory_without_jobs_is_a_one_line_error(tmp_path: Path, capsys):
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no job dir" in err and err.strip().count("\n") == 0


@pytest.mark.cli
def test_bad_directory_is_a_one_line_error(tmp_path: Path):
    """Through the command line: the exit status and the one line reach the terminal."""
    proc = run_cli(str(tmp_path / "nope"), module="housing_reg.report", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no such directory" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.cli
def test_script_writes_elsewhere_with_out(sweeps: Path, tmp_path: Path):
    sweep = shutil.copytree(sweeps / "a", tmp_path / "a")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep), "--out",
         str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| relu |" in proc.stdout
    assert all((tmp_path / "r" / name).exists() for name in (*FIGURES, "summary.md"))
    assert not (sweep / "summary.md").exists()  # --out leaves the sweep alone


# -- issue 10: the report names no winner that the runs do not support --------------------------
@pytest.fixture(scope="module")
def one_run_per_head(tmp_path_factory) -> tuple[Path, str]:
    """The default four-head sweep: one run per head, relu and none identical (as trained:
    test_train.py), sigmoid and tanh stuck at 1."""
    root = tmp_path_factory.mktemp("heads")
    for num, head in enumerate(("relu", "none", "sigmoid", "tanh")):
        predict = off_by(3.3) if head in ("relu", "none") else stuck_at(1.0)
        sweep_job(root, num, f"head={head}", *FAST, predict=predict)
    md, _ = report(root)
    return root, md


@pytest.mark.unit
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


@pytest.mark.unit
def test_relu_and_none_identical_is_a_tie(one_run_per_head):
    _, md = one_run_per_head
    verdict = md.split("## Verdict")[1]
    assert "relu and none tie: identical in every run." in verdict
    assert "relu and none tie: identical test MAE in every run" in verdict
    assert "none worse" not in verdict and "none higher" not in verdict


@pytest.mark.unit
def test_saturated_heads_sit_at_their_bound_in_target_units(one_run_per_head):
    root, md = one_run_per_head
    mean = statistics.mean(float(r["y_true"]) for r in predictions(job_dirs(root)[0]))
    for head in ("sigmoid", "tanh"):
        assert (
            f"- {head}: every test prediction sits at 1.00 ({head}'s upper bound), "
            f"{mean - 1:.2f} below the mean test target {mean:.2f} ($1000s); "
            "1 of 1 runs predicts one price for every house."
        ) in md


@pytest.mark.unit
def test_figures_are_one_size_and_readable(one_run_per_head):
    root, _ = one_run_per_head
    sizes = figure_sizes(root)
    for name, (height, width) in sizes.items():
        assert height >= 450 and width >= 800, name
    assert sizes["curves.png"] == sizes["mae_by_head.png"]  # no longer a 320 px thumbnail


@pytest.mark.unit
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


@pytest.mark.unit
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
@pytest.mark.unit
def test_csv_without_unit_gets_no_boston_words(tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (150, 3))
    score = 40 + 30 * x[:, 0] - 10 * x[:, 1] + rng.normal(0, 1, 150)
    lines = ["a,b,c,score"] + [
        f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{s:.3f}" for r, s in zip(x, score, strict=True)
    ]
    (tmp_path / "lab.csv").write_text("\n".join(lines) + "\n")
    sweep = tmp_path / "sweep"
    data = (f"data.path={tmp_path / 'lab.csv'}", "data.target=score", "model.replicas=2")
    sweep_job(sweep, 0, "head=none", *data, *FAST, predict=off_by(2.0))
    sweep_job(sweep, 1, "head=sigmoid", *data, *FAST, predict=stuck_at(1.0))
    m = read_metrics(job_dirs(sweep)[0])
    assert m["dataset"] == "lab" and m["target"] == {"name": "score", "unit": ""}
    assert report_main([str(sweep)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# Sweep report") and (sweep / "summary.md").read_text() in md
    for word in ("$1000s", "price", "house"):
        assert word not in md.lower()
    assert "Data: lab, target score (no unit)" in md
    assert "runs predict one value for every row" in md  # sigmoid, stuck at 1


@pytest.mark.unit
def test_scaling_sweep_has_a_scaling_column_and_compares_scalings(tmp_path: Path):
    common = ("head=sigmoid", "model.replicas=2", *FAST)
    sweep_job(tmp_path, 0, "data.target_scaling=none", *common, predict=stuck_at(1.0))
    sweep_job(tmp_path, 1, "data.target_scaling=minmax", *common, predict=off_by(2.5))
    # The sweep's own table: a column for what varied, by its short name, and no job names.
    text, failed, _ = summarize(tmp_path)
    assert not failed
    table = text.splitlines()
    assert table[0].split() == ["target_scaling", "train", "MAE", "test", "MAE"]
    assert [row.split()[0] for row in table[1:3]] == ["none", "minmax"]
    md, _ = report(tmp_path)
    header, rows = read_table(md)
    assert header[:3] == ["head", "scaling", "runs"]
    assert sorted(r[1] for r in rows) == ["minmax[0,1]", "none"]
    # Only the scaling varies, so the verdict compares scalings, not heads.
    assert "Best: sigmoid (minmax[0,1] targets), test MAE" in md
    assert "clearly ahead of sigmoid (unscaled targets)" in md


@pytest.mark.unit
def test_diabetes_fails_and_is_fixed_the_same_way(make_cfg, tmp_path: Path):
    """The failure on a second real data set, and target scaling its fix: trained (one fit of
    both jobs, as a fused sweep trains them), then reported."""
    settings = ("data=diabetes", "head=sigmoid", *FAST)
    scalings = ("data.target_scaling=none", "data.target_scaling=minmax")
    jobs = [tmp_path / f"{k}_{s}" for k, s in enumerate(scalings)]
    cfgs = [make_cfg(*settings, s, output_dir=j) for s, j in zip(scalings, jobs, strict=True)]
    assert all(isinstance(m, dict) for m in train_jobs(cfgs))
    mae = {}
    for job, cfg in zip(jobs, cfgs, strict=True):
        (job / ".hydra").mkdir()  # as Hydra writes it: the report finds jobs by it
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
        m = read_metrics(job)
        assert m["dataset"] == "diabetes" and m["target"] == {"name": "progression", "unit": ""}
        mae[m["target_scaling"]] = m["test/mae"]
        if m["target_scaling"] == "none":
            rows = predictions(job)
            mean = statistics.mean(float(r["y_true"]) for r in rows)
            assert all(abs(float(r["y_pred"]) - 1) < 1e-4 for r in rows)  # stuck at its bound
    assert 150 < mae["none"] == pytest.approx(mean - 1, abs=0.01)
    assert mae["minmax"] < mae["none"] / 2  # the fix
    md, _ = report(tmp_path)
    assert f"sits at 1.00 (sigmoid's upper bound), {mean - 1:.2f} below the mean test target" in md
    for word in ("$1000s", "price", "house"):
        assert word not in md.lower()


@pytest.mark.unit
def test_two_data_sets_are_never_compared_with_each_other(tmp_path: Path):
    num = 0
    for data in ("boston", "diabetes"):
        for head, predict in (("none", off_by(3.0)), ("sigmoid", stuck_at(1.0))):
            overrides = (f"data={data}", f"head={head}", "model.replicas=2", *FAST)
            sweep_job(tmp_path, num, *overrides, predict=predict)
            num += 1
    md, _ = report(tmp_path)
    header, rows = read_table(md)
    assert header[:3] == ["head", "data", "runs"]  # the target goes with the data set
    assert [r[1] for r in rows] == ["boston", "boston", "diabetes", "diabetes"]
    boston, diabetes = md.split("- **boston** (MEDV, $1000s):")[1].split("- **diabetes**")
    assert "one price for every house" in boston and "($1000s)" in boston
    assert "one value for every row" in diabetes
    for word in ("$1000s", "price", "house", "boston"):
        assert word not in diabetes


# -- the report on real training -------------------------------------------------------------------
@pytest.mark.cli
def test_report_of_the_readme_sweep(readme_sweep, tmp_path: Path):
    """`python -m housing_reg.report` on the README's trained sweep (a copy of it), one of
    whose jobs has been evaluated: every run's number is the one its job wrote, the evaluation
    is no job, relu and none (identical as trained) tie, and sigmoid and tanh sit at 1."""
    sweep = Path(shutil.copytree(readme_sweep.sweep, tmp_path / "sweep"))
    jobs = job_dirs(sweep)
    evaluated = evaluate(jobs[2] / "checkpoints" / "last.ckpt")  # writes a metrics.json too
    assert Path(evaluated["output_dir"]).parent == jobs[2] / "evaluate"
    proc = run_cli(str(sweep), module="housing_reg.report", cwd=tmp_path)
    md = (sweep / "summary.md").read_text()
    assert md in proc.stdout and "## Verdict" in md and not proc.stderr.strip()
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == [j.name for j in jobs]  # the evaluation is no job
    for row, job in zip(rows, jobs, strict=True):
        (rep,) = replicas(job)
        assert (row["status"], row["head"]) == ("ok", read_metrics(job)["head"])
        assert float(row["test_mae"]) == rep["test/mae"] and row["epochs"] == "2"
    assert "Data: boston, target MEDV ($1000s), 102 test rows." in md
    assert "No best head: one run per head" in md
    assert "relu and none tie: identical in every run." in md
    mean = statistics.mean(float(r["y_true"]) for r in predictions(jobs[0]))
    for head in ("sigmoid", "tanh"):
        assert f"- {head}: every test prediction sits at 1.00 ({head}'s upper bound), " in md
        assert f"{mean - 1:.2f} below the mean test target {mean:.2f} ($1000s)" in md
    sizes = figure_sizes(sweep)
    assert all(h >= 450 and w >= 800 for h, w in sizes.values()), sizes


@pytest.mark.cli
def test_pred_vs_true_figure_is_in_tensorboard_images(readme_sweep):
    job = job_dirs(readme_sweep.sweep)[0]
    images = []
    for f in job.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        if "test/pred_vs_true" in acc.Tags()["images"]:
            images += acc.Images("test/pred_vs_true")
    assert len(images) == 1
    png = matplotlib.image.imread(io.BytesIO(images[0].encoded_image_string), format="png")
    assert png.shape[:2] == (images[0].height, images[0].width) and images[0].width > 200
