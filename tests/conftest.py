"""Shared helpers: compose configs exactly as the CLI does, and run the real CLI."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FAST = ["trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0"]

# .ci/run sets this where it installed every extra: there a missing plugin is a failure.
REQUIRE_EXTRAS = os.environ.get("HOUSING_REG_REQUIRE_EXTRAS") == "1"

# Under pytest-xdist each worker gets its share of the cores as torch threads, for itself and
# the CLI runs it starts (a fused fit takes up to all of them: two workers' fits side by side
# on one core each would spin for the other's): as the parallel launcher shares them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    import torch

    from hydra_plugins.housing_reg_launcher import share_threads

    share_threads(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


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


@pytest.fixture
def make_cfg(tmp_path: Path):
    """compose(overrides) with the job directory pointed at a temp dir."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        with initialize_config_module("housing_reg.conf", version_base="1.3"):
            return compose("config", overrides=[f"output_dir={output_dir or tmp_path}", *overrides])

    return _make


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


def set_up(*args, **kwargs):
    """A RegressionData with its file read, split and scaled, as train.py prepares it."""
    from housing_reg.data import RegressionData

    data = RegressionData(*args, **kwargs)
    data.setup("fit")
    return data


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
