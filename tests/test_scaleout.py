"""Sweeps through Hydra's scale-out plugins: Ray (local and a real `ray start` cluster),
submitit (local executor), Optuna. Each runs the real CLI in a subprocess on tiny settings.

The plugins come with the extras `ray`, `slurm` and `tune`. Without one, its tests skip and
say which extra to install; .ci/run installs them all and sets HOUSING_REG_REQUIRE_EXTRAS=1,
so there a missing one fails.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

import housing_reg.fit as fit_module
import housing_reg.train as train_module
from housing_reg.scaleout import is_loopback, prepare_ray_env

from conftest import job_dirs, need, read_metrics, run_cli, scalars

HEADS = ["none", "relu", "sigmoid", "tanh"]
TINY = ["trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0"]


def check_sweep(sweep: Path, heads: list[str]) -> None:
    """One finished job per head; each TensorBoard run holds the numbers metrics.json does."""
    jobs = job_dirs(sweep)
    assert [read_metrics(j)["head"] for j in jobs] == heads
    for job in jobs:
        m = read_metrics(job)
        assert m["status"] == "ok" and m["epochs"] == 1, m
        tb = scalars(job)
        assert tb["train/mae"] == [pytest.approx(m["train/mae"])], job
        assert tb["test/mae"] == [pytest.approx(m["test/mae"])], job


def summary_heads(stdout: str) -> list[str]:
    """The head column of the table sweep.Sweep prints when a sweep ends (head, train MAE,
    test MAE; one row per finished job, then a blank line)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["head"])
    heads = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        heads.append(line.split()[0])
    return heads


# -- Ray ------------------------------------------------------------------------------------
IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def non_loopback_addresses(root: Path) -> set[str]:
    """IPv4 addresses in Ray's session logs other than loopback and 0.0.0.0."""
    found: set[str] = set()
    for log in root.glob("ray/session_*/logs/*"):
        if log.is_file():
            found |= set(IPV4.findall(log.read_text(errors="replace")))
    assert found, "no addresses in Ray's logs: are its files under RAY_TMPDIR?"
    return {a for a in found if not a.startswith("127.") and a != "0.0.0.0"}


def ray_env(root: Path) -> dict[str, str]:
    """The caller's environment without its Ray settings; Ray's files and token under root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    (root / "home").mkdir(exist_ok=True)
    env.update(HOME=str(root / "home"), RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(pgid: int) -> None:
    """Stop every process of one process group (ours): TERM, then KILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while _live_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _live_members(pgid):
            return


def _live_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


@contextmanager
def ray_head(root: Path, cwd: Path) -> Iterator[str]:
    """A real single-node cluster from `ray start --head` on 127.0.0.1, with token
    authentication; stopped (all of its process group) however the test ends."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**ray_env(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run(
        [ray_bin, "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    start = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2",
            "--object-store-memory=100000000",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the cluster's daemons stay in this process group
    )
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-3000:]
        assert "Token authentication is enabled" in out, out[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        start.kill()
        stop_group(start.pid)
        assert not _live_members(start.pid), "Ray processes survived the teardown"


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.xdist_group("ray")  # one after another: two Rays at once would compete
def test_ray_sweep_on_a_running_cluster(tmp_path: Path):
    """4 heads through hydra/launcher=ray_cluster on a `ray start --head` cluster.

    The driver runs with none of Ray's variables set and a relative sweep dir, from another
    directory than the cluster's: RayDriver must supply the token mode and the loopback
    setting, and pin the sweep dir, or the jobs fail or land in the cluster's directory.
    """
    need("hydra_plugins.hydra_ray_launcher", "ray")
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must be short
    head_dir, driver_dir = tmp_path / "head", tmp_path / "driver"
    head_dir.mkdir()
    driver_dir.mkdir()
    try:
        with ray_head(root, head_dir) as address:
            proc = run_cli(
                "-m",
                "hydra/launcher=ray_cluster",
                f"hydra.launcher.ray.init.address={address}",
                f"head={','.join(HEADS)}",
                *TINY,
                "hydra.sweep.dir=sweep",
                cwd=driver_dir,
                env=ray_env(root),
            )
        check_sweep(driver_dir / "sweep", HEADS)
        assert not (head_dir / "sweep").exists()
        hydra_cfg = yaml.safe_load(
            (job_dirs(driver_dir / "sweep")[0] / ".hydra/hydra.yaml").read_text()
        )
        assert hydra_cfg["hydra"]["sweep"]["dir"] == str(driver_dir / "sweep")
        assert summary_heads(proc.stdout) == HEADS  # the driver found every job's results
        assert "group 0: 4 jobs, 4 models, one task" in proc.stdout  # fused: one Ray task
        assert non_loopback_addresses(root) == set()
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.xdist_group("ray")  # one after another: two Rays at once would compete
def test_ray_sweep_on_a_ray_the_launcher_starts(tmp_path: Path):
    """hydra/launcher=ray as the issue types it: the plugin starts and stops a local Ray."""
    need("hydra_plugins.hydra_ray_launcher", "ray")
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = ray_env(root)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "housing_reg.train",
            "-m",
            "hydra/launcher=ray",
            "head=relu,sigmoid",
            *TINY,
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, out[-3000:]
        check_sweep(tmp_path / "sweep", ["relu", "sigmoid"])
        assert summary_heads(out) == ["relu", "sigmoid"]
        assert "group 0: 2 jobs, 2 models, one task" in out
        assert non_loopback_addresses(root) == set()
        assert not _live_members(driver.pid)  # the plugin stopped its Ray
    finally:
        driver.kill()
        stop_group(driver.pid)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.unit
def test_ray_driver_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for var in (
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "RAY_AUTH_MODE",
        "RAY_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    prepare_ray_env("10.1.2.3:6379")  # a real cluster elsewhere, no token here: nothing to do
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("secret")
    prepare_ray_env("127.0.0.1:6379")
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's own choice wins
    prepare_ray_env(None)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    assert [is_loopback(a) for a in ("localhost:1", "[::1]:2", "127.0.0.9:3", "head:6379")] == [
        True,
        True,
        True,
        False,
    ]


# -- Slurm via submitit ---------------------------------------------------------------------
@pytest.mark.cli
def test_submitit_local_sweep(tmp_path: Path):
    """submitit pickles the job function and runs each job in its own process."""
    need("hydra_plugins.hydra_submitit_launcher", "slurm")
    run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "head=relu,tanh",
        *TINY,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    check_sweep(tmp_path / "sweep", ["relu", "tanh"])
    assert list((tmp_path / "sweep/.submitit").glob("*/*_log.out"))


@pytest.mark.unit
def test_slurm_preset_settings_are_overridable():
    need("hydra_plugins.hydra_submitit_launcher", "slurm")
    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=30",
                "hydra.launcher.cpus_per_task=2",
                "hydra.launcher.gpus_per_node=1",
                "hydra.launcher.poll_s=30",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 30)
    assert (launcher.cpus_per_task, launcher.gpus_per_node) == (2, 1)
    assert (launcher.poll_s, launcher.result_wait_s) == (30, 15)
    assert "slurm_driver" not in cfg.hydra.callbacks  # the launcher does it all


# -- Optuna ---------------------------------------------------------------------------------
OPTUNA = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "data.batch_size=32", *TINY]


@pytest.mark.cli
def test_optuna_minimizes_validation_mae_reproducibly(tmp_path: Path):
    optuna = need("optuna", "tune")
    db = f"sqlite:///{tmp_path / 'study.db'}"
    run_cli(*OPTUNA, "hydra.sweep.dir=a", f"hydra.sweeper.storage={db}", cwd=tmp_path)
    run_cli(*OPTUNA, "hydra.sweep.dir=b", cwd=tmp_path)

    runs = {}
    for name in ("a", "b"):
        jobs = job_dirs(tmp_path / name)
        assert len(jobs) == 3
        runs[name] = [((j / ".hydra/overrides.yaml").read_text(), read_metrics(j)) for j in jobs]
    # Same seed: the sampler proposes the same trials, and they give the same numbers.
    assert [o for o, _ in runs["a"]] == [o for o, _ in runs["b"]]
    assert [m["val/mae"] for _, m in runs["a"]] == [m["val/mae"] for _, m in runs["b"]]
    assert len({m["lr"] for _, m in runs["a"]}) == 3  # the search moved

    best = yaml.safe_load((tmp_path / "a/optimization_results.yaml").read_text())
    val = [m["val/mae"] for _, m in runs["a"]]
    assert best["best_value"] == pytest.approx(min(val))
    winner = runs["a"][val.index(min(val))][1]
    assert best["best_params"]["head"] == winner["head"]
    assert best["best_params"]["optim.lr"] == pytest.approx(winner["lr"])
    assert winner["test/mae"] != pytest.approx(best["best_value"])  # not the test set's

    study = optuna.load_study(study_name="housing_reg", storage=db)
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(val))


@pytest.mark.unit
def test_jobs_run_in_one_process_do_not_pile_up(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Optuna trials and basic-launcher jobs share a process: each job must be freed."""
    models, original = [], fit_module.build_model

    def build_model(jobs, data):
        model = original(jobs, data)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(fit_module, "build_model", build_model)
    for i in range(2):
        train_module.train(make_cfg("data.batch_size=64", *TINY, output_dir=tmp_path / str(i)))
    gc.collect()
    assert [m() for m in models] == [None, None]


@pytest.mark.cli
def test_optuna_without_validation_rows_stops_before_any_trial(tmp_path: Path):
    need("optuna", "tune")
    proc = run_cli(*OPTUNA, "data.val_fraction=0", "hydra.sweep.dir=s", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.val_fraction=0" in proc.stderr.strip().splitlines()[-1]
    assert not job_dirs(tmp_path) and not (tmp_path / "s").exists()
