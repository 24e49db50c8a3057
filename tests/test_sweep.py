"""A sweep at its edges (sweep.py): its `fuse` settings checked before it starts, one
directory per job, no second run into a finished sweep, and messages a user can act on."""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from housing_reg import argv
from housing_reg.settings import ConfigError, check_fuse
from housing_reg.sweep import check_job_dirs, summarize

from conftest import FAST, job_dirs, run_cli


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


# -- every fuse key, checked -------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("enabled", "max_replicas", "fragment"),
    [
        ("off", 512, "fuse.enabled='off' must be true or false"),
        (1, 512, "fuse.enabled=1 must be true or false"),
        (True, 0, "fuse.max_replicas=0 must be a whole number >= 1"),
        (True, -1, "fuse.max_replicas=-1 must be a whole number >= 1"),
        (True, "abc", "fuse.max_replicas='abc' must be a whole number >= 1"),
        (True, 2.5, "fuse.max_replicas=2.5 must be a whole number >= 1"),
    ],
)
def test_each_fuse_setting_is_checked(enabled, max_replicas, fragment):
    fuse = OmegaConf.create({"enabled": enabled, "max_replicas": max_replicas, "group": None})
    with pytest.raises(ConfigError, match="^" + fragment.replace(".", r"\.").replace("(", r"\(")):
        check_fuse(fuse)


@pytest.mark.unit
def test_sensible_fuse_settings_pass():
    for enabled, cap in ((True, 1), (False, 512), (True, None)):  # None: no limit
        check_fuse(OmegaConf.create({"enabled": enabled, "max_replicas": cap, "group": None}))


@pytest.mark.cli
def test_a_bad_fuse_setting_stops_the_sweep_in_one_line_leaving_nothing(tmp_path: Path):
    proc = run_cli(
        "-m", "seed=0,1", "fuse.max_replicas=abc", *FAST, "hydra.sweep.dir=s",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("error: fuse.max_replicas='abc' must be a whole number")
    assert not (tmp_path / "s").exists()  # no multirun.yaml, no stale .lock


@pytest.mark.cli
def test_no_limit_on_a_fit_is_null(tmp_path: Path):
    proc = run_cli("-m", "seed=0,1,2", "fuse.max_replicas=null", *FAST, "hydra.sweep.dir=s",
                   cwd=tmp_path)  # fmt: skip
    assert "group 0: 3 jobs, 3 models, one task" in proc.stdout + proc.stderr


# -- one directory per job ---------------------------------------------------------------------
@pytest.mark.cli
def test_two_jobs_one_directory_is_refused_before_anything_trains(tmp_path: Path):
    for fused in ("true", "false"):
        sweep = tmp_path / f"s_{fused}"
        proc = run_cli(
            "-m", "seed=0,1", "hydra.sweep.subdir=one", f"fuse.enabled={fused}", *FAST,
            f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, fused
        assert last_line(proc) == (
            f"error: 1 directory is shared by several jobs of this sweep ({sweep / 'one'}); "
            "give each job its own, e.g. with ${hydra.job.num} in hydra.sweep.subdir (the default)"
        )
        assert not sweep.exists(), fused  # nothing trained, nothing left


@pytest.mark.unit
def test_job_directories_are_checked_together():
    check_job_dirs(["a/0", "a/1"], [False, False])
    with pytest.raises(ConfigError, match="1 directory is shared"):
        check_job_dirs(["a/0", "a/1", "a/0"], [False, False, False])


# -- a second run into a finished sweep --------------------------------------------------------
@pytest.mark.cli
def test_rerunning_a_finished_sweep_is_refused_unless_resumed(tmp_path: Path):
    args = ("-m", "head=relu,tanh", *FAST, "hydra.sweep.dir=s")
    run_cli(*args, cwd=tmp_path)
    jobs = job_dirs(tmp_path / "s")
    before = {j: ((j / "metrics.json").read_text(), sorted(j.glob("events.*"))) for j in jobs}
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith(
        f"error: 2 job(s) of this sweep already finished in {tmp_path / 's'} ("
    )
    assert last_line(proc).endswith(
        "rerun with resume=true to keep them and train only what is left, or choose another "
        "hydra.sweep.dir"
    )
    run_cli(*args, "resume=true", cwd=tmp_path)  # kept, not trained again
    for job in jobs:  # one TensorBoard run each, as before
        assert ((job / "metrics.json").read_text(), sorted(job.glob("events.*"))) == before[job]


# -- messages ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_next_commands_quote_a_path_with_a_space(tmp_path: Path):
    sweep = tmp_path / "my sweeps" / "s"
    (sweep / "0_head=none" / ".hydra").mkdir(parents=True)
    text, _, _ = summarize(sweep)
    hint = next(line for line in text.splitlines() if line.startswith("next: "))
    report = hint.removeprefix("next: ").split("    (or: ")[0]
    assert shlex.split(report) == ["python", "-m", "housing_reg.report", str(sweep)]
    assert f"tensorboard --logdir {shlex.quote(str(sweep))})" in hint


@pytest.mark.unit
def test_optuna_without_its_extra_names_the_extra(monkeypatch):
    real = importlib.import_module

    def without_optuna(name: str, *args, **kwargs):
        if name.startswith("hydra_plugins.hydra_optuna_sweeper"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(argv.importlib, "import_module", without_optuna)
    with pytest.raises(ConfigError) as e:
        argv.check_choices(["-m", "hparams_search=optuna"])
    assert str(e.value) == (
        "hparams_search=optuna needs the `tune` extra: pip install -e '.[tune]' "
        "(or EXTRAS=dev,tune ./run setup)"
    )


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["--cfg", "--info", "-c"])
def test_multirun_with_another_mode_is_one_line(mode):
    with pytest.raises(ConfigError, match=f"^{mode} shows one job and cannot be combined with -m"):
        argv.check_modes(["-m", "head=relu,none", mode, "job"])
    argv.check_modes(["head=relu", mode, "job"])  # without -m: Hydra's own --cfg


@pytest.mark.cli
def test_multirun_with_cfg_from_the_command_line(tmp_path: Path):
    proc = run_cli("-m", "head=relu,none", "--cfg", "job", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("error: --cfg shows one job and cannot be combined with -m")


@pytest.mark.cli
def test_a_read_only_sweep_directory_is_one_line_and_no_sweep(tmp_path: Path):
    args = ("-m", "seed=0,1", *FAST, "hydra.sweep.dir=s")
    run_cli(*args, cwd=tmp_path)
    sweep = tmp_path / "s"
    if os.geteuid() == 0:  # root writes anywhere: a read-only mount, as a shared disk may be
        bind = subprocess.run(["mount", "--bind", str(sweep), str(sweep)])
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(sweep)])
        if bind.returncode or remount.returncode:
            subprocess.run(["umount", str(sweep)])
            pytest.skip("a read-only directory for root needs a read-only bind mount")
    else:
        sweep.chmod(0o555)
    try:
        proc = run_cli(*args, "resume=true", cwd=tmp_path, check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(sweep)])
        else:
            sweep.chmod(0o755)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: cannot lock s (Read-only file system): a sweep writes its jobs there; "
        "choose a writable hydra.sweep.dir"
        if os.geteuid() == 0
        else "error: cannot lock s (Permission denied): a sweep writes its jobs there; "
        "choose a writable hydra.sweep.dir"
    ]  # no warning, no traceback: that line alone
    assert "resume=true" not in proc.stdout  # no job ran


@pytest.mark.cli
def test_a_refusal_in_a_sweep_is_said_once_and_offers_no_rerun(tmp_path: Path):
    proc = run_cli(
        "-m", "seed=0,1", "+trainer.accumulate_grad_batches=2", *FAST, "hydra.sweep.dir=s",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    said = (proc.stdout + proc.stderr).count("trainer.accumulate_grad_batches=2 is not supported")
    assert said == 2 * 2  # each job's line as it is refused, and in the sweep's list of failures
    assert "resume=true" not in proc.stderr
    assert last_line(proc) == "no retry would change that: fix what the lines above name"
    assert not [j for j in job_dirs(tmp_path / "s") if (j / "metrics.json").exists()]
