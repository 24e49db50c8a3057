"""Shared helpers: compose configs exactly as the CLI does, run the real CLI, write job
directories, and the layers every test belongs to.

Layers (pytest markers; pyproject.toml registers them), exactly one per test:
    unit     in-process: no subprocess, no cluster, a short fit at most
    cli      real `python -m housing_reg...` runs, or another program (a subprocess)
    cluster  Ray and Slurm
`python -m pytest -m unit` runs the unit layer alone; `./run test` runs all three.
"""

from __future__ import annotations

import csv
import fcntl
import importlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FAST = ["trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0"]
LAYERS = ("unit", "cli", "cluster")

# OpenMP threads that wait for work sleep rather than spin: on a machine whose cores are busy
# with other processes (the other pytest worker, a Slurm job, another user), spinning threads
# of a fused fit wait for each other for most of its time (4 jobs in one fit on 2 threads of a
# busy 2-core machine: 12.4 s spinning, 2.6 s sleeping, 1.2 s either way on an idle one). Set
# before torch loads OpenMP; the CLI runs, Slurm jobs and Ray workers that tests start inherit
# it. It changes when a thread waits, never what it computes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402 (after the line above)

# .ci/run sets this where it installed every extra: there a missing plugin is a failure.
REQUIRE_EXTRAS = os.environ.get("HOUSING_REG_REQUIRE_EXTRAS") == "1"

# Under pytest-xdist each worker gets its share of the cores as torch threads, for itself and
# the CLI runs it starts (a fused fit takes up to all of them: two workers' fits side by side
# on one core each would spin for the other's): as the parallel launcher shares them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    from hydra_plugins.housing_reg_launcher import share_threads

    share_threads(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
# The fits that tests run in this process are a few small models: one thread. A second one
# gains them nothing, and where anything else keeps the cores busy, OpenMP's threads wait
# for each other (a fused fit of 40 models on 2 threads of a busy 2-core machine: 19.5 s
# instead of 2.6 s). Threaded fits are the CLI tests' (test_fuse.py gives them 2 threads).
torch.set_num_threads(1)


# -- layers --------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test carries exactly one layer marker: a test without one, or with several, stops
    the run before any test runs (before -m deselects anything)."""
    wrong = []
    for item in items:
        layers = sorted({m.name for m in item.iter_markers() if m.name in LAYERS})
        if len(layers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(layers) or 'none'}")
    if wrong:
        raise pytest.UsageError(
            f"each test needs exactly one of the markers {', '.join(LAYERS)} "
            "(tests/conftest.py); these have none or several:\n  " + "\n  ".join(wrong)
        )
    # The long tests first (clusters, then command lines), the many short ones after: pytest-
    # xdist hands tests out in this order (a cluster's group before single tests), so both
    # workers stay busy to the end instead of one finishing a long test alone.
    rank = {"cluster": 0, "cli": 1, "unit": 2}
    items.sort(key=lambda item: rank[next(m.name for m in item.iter_markers() if m.name in rank)])


def _starts_python(args: object) -> bool:
    """Whether a command line runs Python or a program of this environment (ray,
    tensorboard, ...): what a unit test must not start."""
    first = args[0] if isinstance(args, list | tuple) and args else args
    first = Path(os.fsdecode(first)) if isinstance(first, str | bytes | os.PathLike) else None
    if first is None:
        return False
    venv_bin = Path(sys.executable).parent
    return first.name.startswith("python") or first.parent == venv_bin


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest, monkeypatch) -> None:
    """A unit test that starts Python (the CLI, a script, a Ray) fails: mark it cli."""
    if request.node.get_closest_marker("unit") is None:
        return
    real = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):
        if _starts_python(args):
            raise AssertionError(f"a unit test started {args!r}; mark it cli (conftest.py)")
        real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


# -- extras -----------------------------------------------------------------------------------
def need(module: str, extra: str) -> ModuleType:
    """The extra's module, or a skip that names the extra (a failure under REQUIRE_EXTRAS).

    Call it inside a test: a missing plugin must never break collection. Plugins live in the
    namespace package hydra_plugins, which does not exist at all until one is installed, so
    importlib.util.find_spec("hydra_plugins.x") would raise rather than return None.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if REQUIRE_EXTRAS:
            raise
        pytest.skip(f"needs the {extra} extra (pip install -e '.[{extra}]'): {e}")


# -- configs: composed once per session, a copy for each use --------------------------------
_COMPOSED: dict[tuple[str, ...], bytes] = {}  # pickled
_SPLIT: dict[tuple[str, ...], tuple[tuple[str, ...], list[Override]]] = {}


def compose_cfg(*overrides: str, output_dir: Path | str = "/unused") -> DictConfig:
    """compose("config", overrides) as the CLI composes a job's config, with output_dir set.

    Hydra composes the config of each set of config-group choices once per session (about
    0.15 s a time); every call gets a copy of it, with the other overrides (optim.lr=0.01,
    +key=value, ~key) applied to the copy as compose applies them, after composing, in their
    order, through OmegaConf (as the fused sweeper derives a sweep's jobs from one composed
    config). test_helpers.py checks that the result is compose's, key for key."""
    key = tuple(overrides)
    if key not in _SPLIT:
        _SPLIT[key] = _split(overrides)
    structural, values = _SPLIT[key]
    if structural not in _COMPOSED:
        with initialize_config_module("housing_reg.conf", version_base="1.3"):
            _COMPOSED[structural] = pickle.dumps(compose("config", overrides=list(structural)))
    cfg = pickle.loads(_COMPOSED[structural])  # a deep copy, in a third of deepcopy's time
    for o in values:  # as compose applies them, after composing, in order
        key, value = o.key_or_group, o.value()
        if o.is_delete():  # ~key
            parent, _, last = key.rpartition(".")
            with open_dict(cfg):
                del (OmegaConf.select(cfg, parent) if parent else cfg)[last]
        elif o.is_add() and OmegaConf.select(cfg, key) is not None and not _is_container(value):
            raise ConfigCompositionException(f"Could not append to config: '{key}' is set")
        else:  # key=value: the key must exist (struct); +key / ++key: added
            OmegaConf.update(cfg, key, value, merge=True, force_add=o.is_add() or o.is_force_add())
    cfg.output_dir = str(output_dir)
    return cfg


def _is_container(value: object) -> bool:
    return isinstance(value, dict | list)


def _split(overrides: Sequence[str]) -> tuple[tuple[str, ...], list[Override]]:
    """What compose does with each override, as Hydra's defaults list sorts them: a config
    group's choice (head=tanh, ~logger, hydra/launcher=...) shapes the composition; any other
    (optim.lr=0.01, +trainer.max_steps=100, ~head.range) is applied to the composed config,
    in order, afterwards. Hydra's own settings (hydra.run.dir=...) are composed too: compose
    drops the hydra node before it returns."""
    structural, values = ["output_dir=/unused"], []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        group = o.package is None and _is_group(o.key_or_group)
        if o.is_sweep_override() or o.is_hydra_override() or o.package is not None or group:
            structural.append(o.input_line)
        else:
            values.append(o)
    return tuple(structural), values


_GROUPS: dict[str, bool] = {}


def _is_group(key: str) -> bool:
    """Whether key names a config group, by the repository compose reads (plugins' too)."""
    if key not in _GROUPS:
        with initialize_config_module("housing_reg.conf", version_base="1.3"):
            _GROUPS[key] = bool(GlobalHydra.instance().config_loader().get_group_options(key))
    return _GROUPS[key]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose(overrides) with the job directory pointed at a temp dir."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_cfg(*overrides, output_dir=output_dir or tmp_path)

    return _make


# -- the real command line ------------------------------------------------------------------
def run_cli(
    *args: str,
    cwd: Path,
    module: str = "housing_reg.train",
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m housing_reg.train ...` in a subprocess, as a user would type it."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def run_concurrently(
    commands: Sequence[Sequence[str]], cwd: Path, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Several `python -m ...` at once: each pays seconds of imports, the machine has cores."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *c],
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        for c in commands
    ]
    results = []
    for c, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(list(c), p.returncode, out, err))
    return results


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def readme_sweep(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> SimpleNamespace:
    """The README's sweep, `python -m housing_reg.train -m head=relu,none,sigmoid,tanh` in 2
    epochs, trained ONCE per test session and shared by every test that reads it (under
    pytest-xdist, the first worker to ask trains it and the others wait for it, as
    pytest-xdist's docs show). Its directory is read-only to tests: copy it to write into it.

    root: the working directory it ran in (it holds only multirun/); sweep: its directory;
    stdout, stderr: what the command printed."""
    if worker_id == "master":  # no xdist: this session's own temp dir
        shared = tmp_path_factory.mktemp("readme_sweep")
    else:  # the session's temp dir, which every worker's lies in
        shared = tmp_path_factory.getbasetemp().parent / "readme_sweep"
    record = shared / "proc.json"
    with _exclusive(tmp_path_factory.getbasetemp().parent / "readme_sweep.lock"):
        if not record.exists():
            root = shared / "root"
            root.mkdir(parents=True, exist_ok=True)
            proc = run_cli("-m", "head=relu,none,sigmoid,tanh", *FAST, cwd=root)
            record.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
    proc = json.loads(record.read_text())
    root = shared / "root"
    (sweep,) = {p.parent for p in (root / "multirun").glob("*/*/multirun.yaml")}
    return SimpleNamespace(root=root, sweep=sweep, stdout=proc["stdout"], stderr=proc["stderr"])


# -- data and job directories -----------------------------------------------------------------
def set_up(*args, **kwargs):
    """A RegressionData with its file read, split and scaled, as train.py prepares it."""
    from housing_reg.data import RegressionData

    data = RegressionData(*args, **kwargs)
    data.setup("fit")
    return data


def write_job(
    job: Path,
    *overrides: str,
    predict: Callable[[np.ndarray, int], np.ndarray],
    epochs: int = 2,
) -> dict:
    """A finished job directory as a CLI run with these overrides leaves it (.hydra/'s
    config.yaml and overrides.yaml, and what record.py writes: metrics.json, predictions.csv,
    replicas.csv, replicas.npz), with the test predictions a test chooses instead of trained
    ones: predict(y_true, seed) for each replica. The job's settings, data (its test rows,
    scaler and training targets) and every file come from the package's own code
    (train.prepare, record.JobRecorder); only the numbers are the test's. Returns metrics.json's
    contents."""
    from housing_reg.prepare import prepare
    from housing_reg.record import JobRecorder
    from housing_reg.resume import resolved

    cfg = compose_cfg(*overrides, output_dir=job)
    job.mkdir(parents=True, exist_ok=True)
    ready = prepare(0, cfg)
    data, seeds = ready.data, list(ready.data.seeds)
    y_true = data.unscale(data.splits["test"][1]).double().numpy().ravel()
    pred = torch.tensor(np.array([predict(y_true, s) for s in seeds]), dtype=torch.float64)
    true = torch.tensor(y_true).expand(len(seeds), -1)
    results = {
        "test/pred": pred,
        "test/true": true,
        "test/mae": (pred - true).abs().mean(dim=1),
        "test/mse": ((pred - true) ** 2).mean(dim=1),
    }
    recorder = JobRecorder(resolved(cfg), data, [], slice(0, len(seeds)), {})
    train_mae = results["test/mae"].tolist()  # a stand-in curve: the report reads the last
    recorder.history["train/mae"] = [[v * (epochs - e) for v in train_mae] for e in range(epochs)]
    recorder.fit_seconds = [1.0]
    # The two numbers metrics.json takes from Lightning's trainer: epochs and optimizer steps.
    trainer = SimpleNamespace(current_epoch=epochs, global_step=epochs * 404)
    recorder.record_test(trainer, results, images=None)
    (job / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return read_metrics(job)


def job_dirs(sweep_root: Path) -> list[Path]:
    """Every job directory (one holding .hydra/) under a multirun root, in job order."""
    jobs = [
        p.parent
        for p in sweep_root.rglob(".hydra")
        if (p.parent / "metrics.json").exists() or p.parent.name[:1].isdigit()
    ]
    return sorted(jobs, key=lambda p: int(p.name.split("_", 1)[0]))


def read_metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def replicas(job: Path) -> list[dict]:
    """replicas.csv: per replica, its seed and final metrics."""
    with open(job / "replicas.csv", newline="") as f:
        return [
            {k: int(v) if k == "seed" else float(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar TensorBoard holds for one run directory, read with its own reader."""
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
