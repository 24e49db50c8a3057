"""The tests' own helpers (conftest.py) do what the package does: compose_cfg's configs are
Hydra's compose's, write_job writes the files a trained job writes, and the layer markers
are enforced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from housing_reg.train import train

from conftest import FAST, compose_cfg, read_metrics, write_job

pytestmark = pytest.mark.unit

CASES = [
    (),
    ("head=tanh", "model.hidden=[16,8]", "optim.lr=3e-4", "data.batch_size=16", "seed=5"),
    ("data=diabetes", "data.target_scaling=minmax", "data.target_range=[-1,1]"),
    ("optim=adam", "optim.lr=-0.001", "~head.range"),
    ("+trainer.max_steps=100", "trainer.devices=2", "+lrr=0.1", "+optim.lrr=0.1"),
    ("data.batch_size=abc", "optim.lr=nan", "model.hidden=[64.5]", "trainer.max_epochs=2.5"),
    ("seed=-1", "checkpoint_every=-1", "resume=true", "ckpt_path=/no/such.ckpt"),
    ("data.path=''", 'data.target="prix€"', "data.delimiter=';'", "data.decimal=','"),
    ("~logger", "lr_scheduler=plateau", "lr_scheduler.scheduler.patience=0"),
    ("+callbacks.stop._target_=interrupt.StopAt", "hydra.run.dir=x", "hydra/launcher=parallel"),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o) or "defaults")
def test_compose_cfg_is_hydras_compose(overrides: tuple[str, ...]):
    """conftest.compose_cfg composes each set of group choices once and applies plain values
    to a copy: the config is compose's, every key, value and flag, in the same order."""
    ours = compose_cfg(*overrides, output_dir="/job")
    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        theirs = compose("config", overrides=["output_dir=/job", *overrides])
    assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(theirs)
    assert OmegaConf.is_struct(ours) and OmegaConf.is_struct(theirs)
    again = compose_cfg(*overrides, output_dir="/other")  # a copy: nothing carried over
    assert again.output_dir == "/other" and ours.output_dir == "/job"


def test_write_job_writes_what_a_trained_job_writes(make_cfg, tmp_path: Path):
    """The report's test directories (conftest.write_job) hold the files, keys and columns of
    a trained job's (checkpoints and TensorBoard aside, which the report does not read)."""
    settings = (*FAST, "data.batch_size=32", "model.replicas=2")
    trained = tmp_path / "trained"
    train(make_cfg(*settings, output_dir=trained))
    written = tmp_path / "written"
    write_job(written, *settings, predict=lambda y, seed: y + seed)

    def files(job: Path) -> set[str]:
        return {
            str(p.relative_to(job))
            for p in job.rglob("*")
            if p.is_file() and "checkpoints" not in p.parts and "events" not in p.name
        } - {"hparams.yaml"}

    assert files(written) == files(trained) | {".hydra/config.yaml", ".hydra/overrides.yaml"}
    a, b = read_metrics(trained), read_metrics(written)
    assert a.keys() == b.keys()
    for key in ("head", "dataset", "target", "train_targets", "data_file", "seed", "replicas"):
        assert a[key] == b[key], key
    config = [
        json.dumps(m["config"]).replace(str(j), "JOB") for m, j in ((a, trained), (b, written))
    ]
    assert config[0] == config[1]
    for name in ("replicas.csv", "predictions.csv"):
        header = [(job / name).read_text().splitlines()[0] for job in (trained, written)]
        assert header[0] == header[1], name
    with np.load(trained / "replicas.npz") as x, np.load(written / "replicas.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        assert {k: x[k].shape for k in x.files} == {k: y[k].shape for k in y.files}


def test_a_unit_test_cannot_start_python():
    """The unit layer runs in-process: starting Python (the CLI, a script) fails the test."""
    with pytest.raises(AssertionError, match="mark it cli"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    assert subprocess.run(["true"]).returncode == 0  # other programs are not the CLI
