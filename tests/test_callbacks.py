"""Lightning's callbacks and loggers plug in (conf/callbacks/, conf/logger/), and inside a fused
fit each job gets its own: its early stopping, its best checkpoint, its learning-rate curve,
its loggers, with every file that of its lone run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary

from housing_reg import settings
from housing_reg.settings import ConfigError, check_config

from conftest import FAST, job_dirs, need, read_metrics, run_cli, scalars

VAL = ("data.val_fraction=0.2", "callbacks.progress_bar.refresh_rate=0")
# Early stopping, the best checkpoint tested, the lr each epoch, to TensorBoard and CSV.
EVERYTHING = (
    "callbacks=[default,early_stopping,model_checkpoint,lr_monitor]",
    "callbacks.early_stopping.patience=1",
    "logger=[tensorboard,csv]",
    "test_ckpt=best",
    "lr_scheduler=step",
    "trainer.max_epochs=12",
    *VAL,
)


def ckpt_callbacks(path: Path, sweep: str) -> dict:
    """A checkpoint's callbacks' state, its sweep's name and timings left out."""
    saved = torch.load(path, weights_only=True)["callbacks"]
    saved["JobRecorder"].pop("fit_seconds")
    text = re.sub(r"/(fused|plain|lone)/", "/SWEEP/", json.dumps(saved, default=str))
    return json.loads(text.replace(f"/{sweep}/", "/SWEEP/"))


@pytest.mark.cli
def test_each_job_of_a_fused_fit_gets_its_own_callbacks_and_loggers(tmp_path: Path):
    """relu and sigmoid, two seeds each, one fit: sigmoid stops early (its val/mae is stuck
    at the mean price minus 1), relu trains on; every job's files, curves, best checkpoint
    and callbacks' state are those of the same sweep unfused, job by job, and of a lone run."""
    grid = ("-m", "head=relu,sigmoid", "seed=0,1", *EVERYTHING)
    fused = run_cli(*grid, "hydra.sweep.dir=fused", cwd=tmp_path)
    assert "fit 1 of 1: 4 jobs, 4 models" in fused.stdout
    run_cli(*grid, "fuse.enabled=false", "hydra.sweep.dir=plain", cwd=tmp_path)
    a, b = job_dirs(tmp_path / "fused"), job_dirs(tmp_path / "plain")
    epochs = {}
    for x, y in zip(a, b, strict=True):
        mx, my = read_metrics(x), read_metrics(y)
        epochs[(mx["head"], mx["seed"])] = mx["epochs"]
        for key in ("epochs", "steps", "history", "train/mae", "val/mae", "test/mae"):
            assert mx[key] == my[key], (x.name, key)
        for name in ("replicas.csv", "predictions.csv", "csv/metrics.csv", "csv/hparams.yaml"):
            assert (x / name).read_text() == (y / name).read_text(), (x.name, name)
        assert scalars(x) == scalars(y), x.name
        assert "lr-RMSprop" in scalars(x)  # lr_monitor, to the job's own TensorBoard run
        # The best checkpoint kept, tested, and kept as the result (test_ckpt=best).
        (best,) = (x / "checkpoints/best").glob("*.ckpt")
        assert mx["tested"]["path"] == str(best)
        assert (x / "checkpoints/result.ckpt").read_bytes() == best.read_bytes()
        assert ckpt_callbacks(x / "checkpoints/last.ckpt", "fused") == ckpt_callbacks(
            y / "checkpoints/last.ckpt", "plain"
        )
    assert epochs[("sigmoid", 0)] < epochs[("relu", 0)] <= 12  # each job stopped on its own
    # A lone run of one of them (no -m): the same files again.
    lone = tmp_path / "lone"
    run_cli("head=sigmoid", "seed=1", *EVERYTHING, f"hydra.run.dir={lone}", cwd=tmp_path)
    assert (lone / "replicas.csv").read_text() == (a[3] / "replicas.csv").read_text()
    assert read_metrics(lone)["epochs"] == read_metrics(a[3])["epochs"]
    assert scalars(lone) == scalars(a[3])


@pytest.mark.cli
def test_any_stock_callback_by_its_target_and_its_own_checkpoint_file(tmp_path: Path):
    """The issue's commands as a user types them: EarlyStopping and LearningRateMonitor by
    _target_, and a ModelCheckpoint writing beside last.ckpt without touching it."""
    run_cli(
        *VAL,
        "trainer.max_epochs=30",
        "+callbacks.es._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.es.monitor=val/mae",
        "+callbacks.lrm._target_=lightning.pytorch.callbacks.LearningRateMonitor",
        "+callbacks.mc._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.mc.monitor=val/mae",
        "+callbacks.mc.save_top_k=1",
        "+callbacks.mc.dirpath=${output_dir}/checkpoints",
        "+callbacks.mc.filename=mc",
        "hydra.run.dir=j",
        cwd=tmp_path,
    )
    job = tmp_path / "j"
    m = read_metrics(job)
    assert m["epochs"] < 30  # stopped early
    assert {"lr-RMSprop", "train/mae", "val/mae"} <= set(scalars(job))
    last = torch.load(job / "checkpoints/last.ckpt", weights_only=True)
    assert last["epoch"] == m["epochs"] - 1  # the recorder's own, where training stopped
    mc = torch.load(job / "checkpoints/mc.ckpt", weights_only=True)
    assert mc["hyper_parameters"]["replicas"] == 1  # the job's share, a checkpoint of its own


@pytest.mark.cli
def test_mlflow_keeps_one_run_per_job_in_the_sweeps_store(tmp_path: Path):
    mlflow = need("mlflow", "mlflow")
    args = ("-m", "head=relu,sigmoid", "seed=0,1", "logger=mlflow", *FAST, *VAL)
    run_cli(*args, "hydra.sweep.dir=s", cwd=tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["housing_reg"], output_format="list")
    jobs = job_dirs(tmp_path / "s")
    assert sorted(r.info.run_name for r in runs) == sorted(j.name for j in jobs)
    for run in runs:
        job = tmp_path / "s" / run.info.run_name
        m = read_metrics(job)
        assert run.data.params["head"] == m["head"] and int(run.data.params["seed"]) == m["seed"]
        assert run.data.metrics["test/mae"] == pytest.approx(m["test/mae"])
        assert run.info.status == "FINISHED"


@pytest.mark.cli
def test_clipping_through_lightnings_hook_under_bf16_mixed(tmp_path: Path):
    """trainer.precision=bf16-mixed with clipping: replica 1 of a two-replica job is the lone
    run with seed 1, clipped the same way (each replica by its own norm), and clipping acts."""
    common = ("trainer.precision=bf16-mixed", *FAST)
    clip = "+trainer.gradient_clip_val=0.05"
    run_cli(*common, clip, "model.replicas=2", "hydra.run.dir=two", cwd=tmp_path)
    run_cli(*common, clip, "seed=1", "hydra.run.dir=lone", cwd=tmp_path)
    run_cli(*common, "seed=1", "hydra.run.dir=free", cwd=tmp_path)
    two, lone, free = (
        np.load(tmp_path / d / "replicas.npz")["test_pred"] for d in ("two", "lone", "free")
    )
    assert np.array_equal(two[1], lone[0])
    assert not np.array_equal(lone[0], free[0])
    assert read_metrics(tmp_path / "two")["config"]["trainer"]["precision"] == "bf16-mixed"


# -- refused in one line, before anything trains (in-process: the check the CLI runs) ---------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["+callbacks.x._target_=lightning.pytorch.callbacks.EarlyStoping"],
            "callbacks.x._target_=lightning.pytorch.callbacks.EarlyStoping: no such class",
        ),
        (
            ["callbacks=[default,early_stopping]"],
            "callbacks.early_stopping.monitor=val/mae: no job logs it (validation rows: "
            "data.val_fraction=0.2); monitor one of train/mae, train/loss, train/lr",
        ),
        (
            ["callbacks=[default,early_stopping]", "callbacks.early_stopping.mode=maximum", VAL[0]],
            "callbacks.early_stopping.mode=maximum must be min or max",
        ),
        (
            ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
             "+callbacks.swa.swa_lrs=0.01"],
            "callbacks.swa: StochasticWeightAveraging cannot work here: it averages the weights",
        ),
        (
            ["+callbacks.d._target_=lightning.pytorch.callbacks.DeviceStatsMonitor"],
            "callbacks.d: DeviceStatsMonitor cannot work here: it acts once per batch",
        ),
        (["test_ckpt=best"], "test_ckpt=best tests the best model a checkpoint callback kept"),
        (
            ["+logger.x._target_=lightning.pytorch.loggers.CSVLoger"],
            "logger.x._target_=lightning.pytorch.loggers.CSVLoger: no such class",
        ),
        (
            ["+callbacks.l._target_=lightning.pytorch.loggers.CSVLogger"],
            "callbacks.l._target_=lightning.pytorch.loggers.CSVLogger is not a "
            "lightning.pytorch.callbacks.callback.Callback",
        ),
    ],
)  # fmt: skip
def test_a_callback_or_logger_that_cannot_work_is_one_line(make_cfg, overrides, line):
    with pytest.raises(ConfigError) as e:
        check_config(make_cfg(*overrides))
    assert str(e.value).startswith(line), str(e.value)


@pytest.mark.unit
def test_a_logger_without_its_extra_names_the_extra(make_cfg, monkeypatch):
    monkeypatch.setattr(settings.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^logger.mlflow needs the `mlflow` extra: pip install"):
        check_config(make_cfg("logger=mlflow"))


@pytest.mark.cli
def test_a_refused_callback_is_one_line_on_the_command_line(tmp_path: Path):
    proc = run_cli(*FAST, "callbacks=[default,early_stopping]", "hydra.run.dir=j",
                   cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: callbacks.early_stopping.monitor=val/mae: no job logs it")
    )
    assert not (tmp_path / "j" / "checkpoints").exists()


class BusReader(ModelSummary):
    """A fit-wide callback (a ModelSummary: the Trainer's own) that keeps what Lightning's
    metric bus holds when training ends."""

    seen: dict[str, float] = {}

    def on_train_end(self, trainer, model) -> None:
        BusReader.seen = {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.unit
def test_fit_wide_callbacks_see_the_fits_means_on_lightnings_bus(make_cfg):
    """The module logs its epoch metrics through self.log: a fit-wide callback reads them in
    trainer.callback_metrics, the means over the fit's replicas."""
    from housing_reg.train import train

    reader = "+callbacks.bus._target_=test_callbacks.BusReader"
    m = train(
        make_cfg("trainer.max_epochs=1", "model.replicas=3", "data.batch_size=32", *VAL, reader)
    )
    assert set(BusReader.seen) == {"train/mae", "train/loss", "train/lr", "val/mae"}
    assert BusReader.seen["train/mae"] == pytest.approx(m["train/mae"])  # the replicas' mean
    assert BusReader.seen["val/mae"] == pytest.approx(m["val/mae"])
