"""Faults: NaN losses, interrupts and resume, checkpoint evaluation, sweep directories, atomic
writes, and same seed -> same numbers. Each scenario runs for real, mostly through the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock, Timeout
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from housing_reg.data import BOSTON_CSV, DataError, keras_split
from housing_reg.evaluate import evaluate
from housing_reg.jobdir import RecordError, read_state, write_json
from housing_reg.runs import record_failure
from housing_reg.settings import ConfigError
from housing_reg.sweep import Sweep, lock, summarize, unlock
from housing_reg.train import train

from conftest import compose_cfg, job_dirs, read_metrics, replicas, run_cli

QUIET = "callbacks.progress_bar.refresh_rate=0"
TESTS = Path(__file__).parent


def numbers(metrics: dict) -> dict:
    """Everything a run measured; not its wall-clock time or where it was written."""
    timing = ("fit_seconds", "fit_seconds_per_session", "config")
    return {k: v for k, v in metrics.items() if k not in timing}


def cfg_for(out: Path, *overrides: str):
    return compose_cfg(QUIET, *overrides, output_dir=out)


def popen(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(TESTS)},  # tests/interrupt.py
    )


def failure(job: Path) -> dict:
    return json.loads((job / "failure.json").read_text())


def own_csv(path: Path, rows: int = 80) -> Path:
    """A made-up regression table: 3 features, target `price` in the middle."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3))
    y = 50 + x @ [3.0, -2.0, 1.0] + rng.normal(size=rows)
    lines = ["size,rooms,price,age"] + [
        f"{a:.4f},{b:.4f},{t:.4f},{c:.4f}" for (a, b, c), t in zip(x, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.cli
def test_own_csv_sweep_keeps_good_jobs_when_one_diverges(tmp_path: Path) -> None:
    """Any CSV with a '/' in its path, through a sweep: one job diverges (NaN), the other's
    results, TensorBoard run and predictions survive, and the sweep exits 1 naming the job."""
    data = own_csv(tmp_path / "my data.csv")
    proc = run_cli(
        "-m",
        f"data.path={data}",
        "data.target=price",
        "data.batch_size=8",
        "optim.lr=1e-3,1e10",
        "trainer.max_epochs=2",
        QUIET,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1
    good, bad = jobs = job_dirs(sweeps[0])
    assert [j.parent for j in jobs] == [sweeps[0]] * 2  # '/' in data.path nests nothing
    assert "data.path=" in good.name and "optim.lr=0.001" in good.name
    assert f"1 job(s) failed: {bad.name}: failed: FloatingPointError: training" in proc.stderr
    # A diverged fit diverges again when rerun: no rerun command is offered
    assert "resume=true" not in proc.stderr and "no retry would change that" in proc.stderr
    table = proc.stdout[re.search(r"^lr +train MAE", proc.stdout, re.M).start() :].splitlines()
    assert table[0].split() == ["lr", "train", "MAE", "test", "MAE"]  # only what varied
    assert table[1].startswith("0.001 ") and len(table[1].split()) == 3

    m = read_metrics(good)
    assert m["status"] == "ok" and m["epochs"] == 2 and len(m["history"]["train/mae"]) == 2
    assert "num_features: 3" in (good / "hparams.yaml").read_text()
    assert len((good / "predictions.csv").read_text().splitlines()) == 1 + 16  # 20% of 80
    events = EventAccumulator(str(good))
    events.Reload()
    assert [len(events.Scalars(t)) for t in ("train/mae", "test/mae")] == [2, 1]

    failed = failure(bad)
    assert failed["status"] == "failed" and failed["config"]["optim"]["lr"] == 1e10
    assert "lower optim.lr" in failed["error"]
    assert not (bad / "metrics.json").exists()
    assert not (bad / "checkpoints").exists()  # a NaN model is never checkpointed
    _, failures, retry = summarize(sweeps[0])
    assert not retry
    assert len(failures) == 1 and failures[0].startswith(bad.name)


@pytest.mark.cli
def test_interrupt_resume_evaluate_and_rerun_match_an_uninterrupted_run(tmp_path: Path) -> None:
    settings = ("trainer.max_epochs=3", "model.replicas=2", "data.batch_size=32")
    args = ("housing_reg.train", *settings, QUIET)
    full, cut = tmp_path / "full", tmp_path / "cut"
    ckpt = cut / "checkpoints" / "last.ckpt"
    uninterrupted = popen(*args, f"hydra.run.dir={full}", cwd=tmp_path)
    ctrl_c = ("+callbacks.interrupt._target_=interrupt.InterruptAt", "+callbacks.interrupt.epoch=1")
    interrupted = popen(*args, f"hydra.run.dir={cut}", *ctrl_c, cwd=tmp_path)
    _, err = interrupted.communicate(timeout=300)
    _, full_err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, full_err[-2000:]

    assert interrupted.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: interrupted with 1 of 3 epochs done; to continue, run: python", last)
    assert f"resume=true hydra.run.dir={cut}" in last
    assert failure(cut)["status"] == "interrupted" and not (cut / "metrics.json").exists()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    history = saved["callbacks"]["JobRecorder"]["history"]
    assert saved["epoch"] == 0 and len(history["train/mae"]) == 1

    # Resume the cut run, and evaluate the full run's checkpoint on its test split, through
    # the functions those commands run (the command line's own part: the lines above).
    train(cfg_for(cut, *settings, "resume=true"))
    evaluate(full / "checkpoints" / "last.ckpt")
    expected = read_metrics(full)
    assert numbers(read_metrics(cut)) == numbers(expected)  # bit-identical after resume
    for name in ("predictions.csv", "replicas.csv"):
        assert (cut / name).read_bytes() == (full / name).read_bytes()
    assert not (cut / "failure.json").exists()  # the finished retry clears the failure
    assert len(read_metrics(cut)["fit_seconds_per_session"]) == 2  # the resumed part apart

    m = json.loads((full / "evaluate" / "last_on_test_split" / "metrics.json").read_text())
    assert m["mae"] == expected["test/mae"] and m["rows"] == 102
    evaluated = replicas(full / "evaluate" / "last_on_test_split")
    assert [r["mae"] for r in evaluated] == [r["test/mae"] for r in replicas(full)]
    pred = (full / "evaluate" / "last_on_test_split" / "predictions.csv").read_bytes()
    assert pred == (full / "predictions.csv").read_bytes()

    # The job directory's saved config alone reruns the job to the same numbers.
    cfg = OmegaConf.load(full / ".hydra" / "config.yaml")
    cfg.output_dir = str(tmp_path / "rerun")
    assert numbers(train(cfg)) == numbers(expected)


@pytest.fixture(scope="module")
def one_epoch_job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_epoch")
    cfg = cfg_for(out, "trainer.max_epochs=1", "data.batch_size=32", "data.val_fraction=0.1")
    train(cfg)
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # as Hydra saves it for a CLI run
    return out


@pytest.mark.unit
def test_ckpt_path_continues_to_the_same_numbers(one_epoch_job: Path, tmp_path: Path) -> None:
    ckpt = one_epoch_job / "checkpoints" / "last.ckpt"
    two = ("trainer.max_epochs=2", "data.batch_size=32", "data.val_fraction=0.1")
    resumed = train(cfg_for(tmp_path / "resumed", *two, f"ckpt_path={ckpt}"))
    straight = train(cfg_for(tmp_path / "straight", *two))
    assert resumed["epochs"] == 2
    assert [len(resumed["history"][k]) for k in ("train/mae", "val/mae")] == [2, 2]
    assert numbers(resumed) == numbers(straight)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.hidden=[8]"], "model.hidden: [64, 64] there, [8] here"),
        (["head=relu"], "head.name: none there, relu here"),
        (["model.replicas=2"], "model.replicas: 1 there, 2 here"),
        (["data.target_scaling=standard"], "data.target_scaling: none there, standard here"),
        (["data.num_folds=4", "data.val_fraction=0"], "data.num_folds: 0 there, 4 here"),
        (["optim.lr=0.01"], "optim.lr: 0.001 there, 0.01 here"),
        (["data.batch_size=16"], "data.batch_size: 32 there, 16 here"),
        (["optim=adam"], "optim._target_: torch.optim.RMSprop there, torch.optim.Adam here"),
    ],
)
def test_resuming_with_other_settings_is_refused(
    one_epoch_job: Path, tmp_path: Path, overrides: list[str], fragment: str
) -> None:
    ckpt = one_epoch_job / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as e:
        train(cfg_for(tmp_path, "trainer.max_epochs=2", f"ckpt_path={ckpt}", *overrides))
    assert fragment in str(e.value) and "resume with the settings" in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.unit
def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    m = train(cfg_for(tmp_path, "trainer.max_epochs=1", "data.batch_size=64", "resume=true"))
    assert m["epochs"] == 1 and (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.unit
def test_evaluate_own_csv_matches_columns_by_name(one_epoch_job: Path, tmp_path: Path) -> None:
    """A CSV with columns reordered, an extra column and one row predicts the same numbers."""
    lines = BOSTON_CSV.read_text().splitlines()
    header = lines[0].split(",")
    shuffled = [",".join(["junk", *reversed(line.split(","))]) for line in lines[:6]]
    shuffled[0] = ",".join(["junk", *reversed(header)])
    (tmp_path / "reordered.csv").write_text(
        "\n".join(["7" + s[4:] if i else s for i, s in enumerate(shuffled)]) + "\n"
    )
    (tmp_path / "one_row.csv").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "five_rows.csv").write_text("\n".join(lines[:6]) + "\n")
    ckpt = one_epoch_job / "checkpoints" / "last.ckpt"
    results = {
        name: evaluate(ckpt, str(tmp_path / f"{name}.csv"), tmp_path / name)
        for name in ("reordered", "one_row", "five_rows")
    }
    pred = {n: (tmp_path / n / "predictions.csv").read_text().splitlines() for n in results}
    assert len(pred["five_rows"]) == 6 and pred["reordered"] == pred["five_rows"]
    assert pred["one_row"] == pred["five_rows"][:2]
    assert results["five_rows"]["rows"] == 5 and results["five_rows"]["mae"] > 0


@pytest.mark.cli
def test_two_sweeps_started_together_never_share_a_directory(tmp_path: Path) -> None:
    """The default sweep dir with its timestamp frozen: the uid alone must tell them apart."""
    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        hydra_cfg = compose("config", return_hydra_config=True).hydra
    pattern = OmegaConf.to_container(hydra_cfg.sweep)["dir"]
    assert "${uid:}" in pattern
    frozen = re.sub(r"\$\{now:[^}]*\}", "same-instant", pattern)
    sweep = ("housing_reg.train", "-m", f"hydra.sweep.dir={frozen}", "head=none,relu")
    fast = ("trainer.max_epochs=1", "data.batch_size=64", QUIET)
    procs = [popen(*sweep, *fast, cwd=tmp_path) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    sweeps = sorted(p.parent for p in tmp_path.glob("multirun/**/multirun.yaml"))
    assert len(sweeps) == 2
    for s in sweeps:
        assert [read_metrics(j)["head"] for j in job_dirs(s)] == ["none", "relu"]


@pytest.mark.unit
def test_write_json_is_atomic(tmp_path: Path) -> None:
    """A reader polling metrics.json while it is rewritten never sees a partial file."""
    path = tmp_path / "metrics.json"
    big = {"history": [[float(i)] * 20 for i in range(2000)]}
    write_json(path, big)
    stop, seen, broken = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(len(json.loads(path.read_text())["history"]))
            except ValueError as e:  # a half-written file
                broken.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(30):
        write_json(path, {"history": big["history"][: 1000 + n]})
    stop.set()
    reader.join()
    assert not broken and seen and all(1000 <= n <= 2000 for n in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


@pytest.mark.unit
def test_same_seed_same_numbers(tmp_path: Path) -> None:
    settings = ("trainer.max_epochs=2", "data.batch_size=16", "model.replicas=2")
    settings += ("data.val_fraction=0.2",)
    first = train(cfg_for(tmp_path / "a", "seed=3", *settings))
    again = train(cfg_for(tmp_path / "b", "seed=3", *settings))
    other = train(cfg_for(tmp_path / "c", "seed=4", *settings))
    assert numbers(first) == numbers(again)
    assert first["test/mae"] != other["test/mae"]
    assert replicas(tmp_path / "a") == replicas(tmp_path / "b") != replicas(tmp_path / "c")
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (
        tmp_path / "b" / "predictions.csv"
    ).read_bytes()
    assert first["config"]["seed"] == 3
    assert {"housing_reg", "torch", "lightning", "python"} <= set(first["versions"])


@pytest.mark.unit
def test_sweep_summary_counts_a_killed_job_as_failed(tmp_path: Path) -> None:
    for name, status in (("0_head=none", "ok"), ("1_head=relu", None)):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        if status:
            metrics = {"status": status, "head": "none", "train/mae": 1.0, "test/mae": 2.0}
            write_json(tmp_path / name / "metrics.json", metrics)
    table, failed, retry = summarize(tmp_path)
    assert "1.000" in table and "2.000" in table
    assert failed == ["1_head=relu: incomplete: no metrics.json (still running, or killed)"]
    assert retry  # a killed job may well finish when run again


@pytest.mark.unit
def test_a_failed_retry_never_destroys_a_good_result(one_epoch_job: Path, tmp_path: Path):
    """Rerun a finished job's directory from a truncated checkpoint: the run fails with one
    line, failure.json records it beside the untouched metrics.json, and readers keep the
    good result."""
    job = tmp_path / "job"
    shutil.copytree(one_epoch_job, job)
    good = (job / "metrics.json").read_bytes()
    ckpt = job / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    overrides = ("trainer.max_epochs=2", "data.batch_size=32", "data.val_fraction=0.1")
    with pytest.raises(RecordError, match="not a housing_reg checkpoint"):
        train(cfg_for(job, *overrides, "resume=true"))
    record_failure(cfg_for(job, *overrides, "resume=true"), "failed", RecordError("truncated"))
    assert (job / "metrics.json").read_bytes() == good
    assert failure(job)["error"] == "RecordError: truncated"
    read = read_state(job)
    assert read.status == "ok" and "a later retry failed" in read.note


@pytest.mark.unit
def test_resuming_a_finished_job_changes_nothing(one_epoch_job: Path, tmp_path: Path):
    job = tmp_path / "job"
    shutil.copytree(one_epoch_job, job)
    before = {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()}
    overrides = ("trainer.max_epochs=1", "data.batch_size=32", "data.val_fraction=0.1")
    m = train(cfg_for(job, *overrides, "resume=true"))
    assert {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()} == before
    assert m == read_metrics(job)


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if proc.returncode != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")


@pytest.mark.cli
def test_a_full_disk_fails_in_one_line_and_the_sweep_stops_with_its_summary(tmp_path: Path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "150k")  # room for about one job
    try:
        heads = "head=relu,none,sigmoid,tanh"  # one task per job, so that the first fits
        sweep = ("-m", heads, "fuse.enabled=false", "trainer.max_epochs=2", QUIET)
        sweep = (*sweep, f"hydra.sweep.dir={disk / 's'}")
        proc = run_cli(*sweep, cwd=tmp_path, check=False)
        assert proc.returncode == 1
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert err[-1] == "error: stopped: OSError: [Errno 28] No space left on device"
        assert "Traceback" not in proc.stderr
        assert "relu " in proc.stdout and "sweep directory:" in proc.stdout  # the summary
        jobs = job_dirs(disk / "s")
        assert read_metrics(jobs[0])["status"] == "ok"  # the job that fit keeps its results
        assert not list(disk.rglob("*.tmp")) and not list(disk.rglob(".*.tmp"))
        assert not (disk / "s" / ".lock").exists()
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.cli
def test_a_full_disk_under_one_fused_job_fails_that_job_alone(tmp_path: Path):
    """Three heads train as one fit; job 1's directory is a full disk. Job 1 fails in one
    line, the other two finish with their own files, and no traceback is printed."""
    sweep = tmp_path / "s"
    full = sweep / "1_head=none,trainer.max_epochs=2"
    mount_tmpfs(full, "40k")  # room for .hydra/ and little else
    try:
        args = ("-m", "head=relu,none,sigmoid", "trainer.max_epochs=2", QUIET)
        proc = run_cli(*args, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
        assert proc.returncode == 1
        assert "group 0: 3 jobs, 3 models, one task" in proc.stdout
        assert "Traceback" not in proc.stderr + proc.stdout
        failed = [line for line in proc.stdout.splitlines() if "job failed:" in line]
        assert len(failed) == 1 and failed[0].endswith(
            f"job failed: {full.name}: OSError: [Errno 28] No space left on device"
        )
        first, _, third = job_dirs(sweep)
        assert [read_metrics(j)["head"] for j in (first, third)] == ["relu", "sigmoid"]
        for job in (first, third):
            assert (job / "checkpoints/last.ckpt").is_file() and (job / "predictions.csv").is_file()
        assert not list(full.rglob("*.tmp")) and not list(full.rglob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(full)])


@pytest.mark.cli
def test_a_second_live_sweep_into_the_same_directory_is_refused(tmp_path: Path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    held = FileLock(sweep_dir / ".lock", timeout=0)
    held.acquire()  # a live sweep (this process) holds it
    args = ("-m", "head=none", "trainer.max_epochs=1", QUIET, f"hydra.sweep.dir={sweep_dir}")
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: another sweep is writing to {sweep_dir}; "
        "wait for it to finish or choose another hydra.sweep.dir"
    )
    assert not job_dirs(sweep_dir)
    held.release()  # the lock file stays, as a killed sweep's would: no lock is held


@pytest.mark.unit
def test_a_stale_sweep_lock_is_taken_over(tmp_path: Path):
    """A lock file that no process holds (a killed sweep's, as the CLI test above leaves it):
    the next sweep takes it (the Sweep callback's lock), and frees it as it ends (the CLI tests
    see a finished sweep leave none)."""
    (tmp_path / ".lock").write_text("")
    lock(tmp_path)
    try:
        assert Sweep.held is not None and Sweep.held.is_locked
        with pytest.raises(Timeout):  # held now: a second sweep would be refused
            FileLock(tmp_path / ".lock", timeout=0).acquire()
    finally:
        unlock(tmp_path)
    assert Sweep.held is None and not (tmp_path / ".lock").exists()


@pytest.mark.unit
def test_evaluate_reproduces_training_predictions_whatever_the_offsets(tmp_path: Path):
    """A timestamp-like feature (1e9 plus small values): scaling in float32 would lose it."""
    rng = np.random.default_rng(1)
    n = 120
    t = rng.normal(size=n)
    rows = np.column_stack([1e9 + t, rng.normal(size=n), 10 + 3 * t + 0.1 * rng.normal(size=n)])
    header = "stamp,noise,y"
    data = tmp_path / "stamps.csv"
    np.savetxt(data, rows, delimiter=",", header=header, comments="", fmt="%.9f")
    job = tmp_path / "job"
    overrides = (f"data.path={data}", "data.target=y", "data.batch_size=8", f"output_dir={job}")
    train(cfg_for(job, *overrides, "trainer.max_epochs=3"))
    _, test_idx = keras_split(n)
    held_out = tmp_path / "held_out.csv"
    np.savetxt(held_out, rows[test_idx], delimiter=",", header=header, comments="", fmt="%.9f")
    m = evaluate(job / "checkpoints" / "last.ckpt", str(held_out), tmp_path / "eval")
    ours = np.loadtxt(tmp_path / "eval" / "predictions.csv", delimiter=",", skiprows=1)
    trained = np.loadtxt(job / "predictions.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(ours, trained, rtol=1e-6)
    assert m["mae"] == pytest.approx(read_metrics(job)["test/mae"], rel=1e-6)
    beyond = tmp_path / "beyond.csv"
    beyond.write_text(f"{header}\n1e45,0.5,10\n")
    with pytest.raises(DataError, match="stamp hold values that.*beyond float32's range"):
        evaluate(job / "checkpoints" / "last.ckpt", str(beyond), tmp_path / "eval2")


@pytest.mark.unit
def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None},
    }
