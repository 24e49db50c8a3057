"""Real Hydra runs: compose API through train(), and `python -m housing_reg.train -m` sweeps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from housing_reg.argv import check_choices
from housing_reg.data import FitData
from housing_reg.fit import build_model
from housing_reg.prepare import prepare
from housing_reg.settings import ConfigError, create
from housing_reg.train import train

from conftest import FAST, job_dirs, read_metrics, run_cli, scalars


@pytest.mark.unit
def test_overrides_reach_the_model_optimizer_and_trainer(make_cfg):
    cfg = make_cfg(
        *FAST,
        "head=tanh",
        "model.hidden=[16,8]",
        "optim.lr=3e-4",
        "data.batch_size=16",
        "trainer.max_epochs=3",
        "seed=5",
        "model.replicas=2",
    )
    job = prepare(0, cfg)
    data = FitData([job.data])
    model, trainer = build_model([job], data), create(cfg.trainer)
    assert [tuple(w.shape) for w in model.net.weights] == [(2, 13, 16), (2, 16, 8), (2, 8, 1)]
    assert isinstance(model.head, torch.nn.Tanh)
    assert model.configure_optimizers().param_groups[0]["lr"] == 3e-4
    assert isinstance(model.configure_optimizers(), torch.optim.RMSprop)
    assert trainer.max_epochs == 3 and data.batch_size == 16
    assert data.seeds == model.seeds == [5, 6]


@pytest.mark.unit
def test_train_writes_metrics_predictions_and_tensorboard(make_cfg, tmp_path: Path):
    metrics = train(make_cfg("head=none", *FAST))
    on_disk = read_metrics(tmp_path)
    assert on_disk["status"] == "ok" and on_disk["head"] == "none" and on_disk["seed"] == 0
    assert on_disk["epochs"] == 2 and on_disk["steps"] == 2 * 404
    assert on_disk["fit_seconds"] > 0
    for key in ("train/mae", "test/mae", "test/mse"):
        assert on_disk[key] == pytest.approx(metrics[key])
    assert on_disk["test/mae"] < 6  # a real fit: the mean-predictor baseline is ~6.6
    assert len(on_disk["history"]["train/mae"]) == 2
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 102
    y_true = torch.tensor([float(r["y_true"]) for r in rows])
    y_pred = torch.tensor([float(r["y_pred"]) for r in rows])
    assert (y_pred - y_true).abs().mean().item() == pytest.approx(on_disk["test/mae"], rel=1e-4)
    tb = scalars(tmp_path)
    assert tb["test/mae"][-1] == pytest.approx(on_disk["test/mae"], rel=1e-6)
    assert len(tb["train/mae"]) == 2  # once per epoch, not per step


@pytest.mark.cli
def test_head_sweep_from_the_command_line(readme_sweep):
    """The README's sweep (conftest.readme_sweep): its job directories, numbers and table."""
    root, stdout = readme_sweep.root, readme_sweep.stdout
    assert sorted(p.name for p in root.iterdir()) == ["multirun"]  # no lightning_logs/
    jobs = job_dirs(root / "multirun")
    assert [j.name for j in jobs] == [
        f"{i}_head={h},trainer.max_epochs=2"
        for i, h in enumerate(["relu", "none", "sigmoid", "tanh"])
    ]
    test_mae = {}
    for job in jobs:
        m = read_metrics(job)
        assert m["status"] == "ok"
        assert (job / ".hydra" / "config.yaml").exists()
        tb = scalars(job)
        assert tb["test/mae"][-1] == pytest.approx(m["test/mae"], rel=1e-6)
        test_mae[m["head"]] = tb["test/mae"][-1]
    # Bounded heads cannot reach prices around 22: their error stays near the mean price.
    good = max(test_mae["relu"], test_mae["none"])
    assert min(test_mae["sigmoid"], test_mae["tanh"]) > 3 * good
    assert test_mae["sigmoid"] > 15
    # Positive prices: relu is the identity, the same model as none, to the last bit.
    assert read_metrics(jobs[0])["test/mae"] == read_metrics(jobs[1])["test/mae"]
    assert (jobs[0] / "replicas.csv").read_text() == (jobs[1] / "replicas.csv").read_text()
    # The end-of-sweep table: what varied (the head), the MAEs, where it all went, what next.
    table = stdout[stdout.index("head ") :].splitlines()
    assert table[0].split() == ["head", "train", "MAE", "test", "MAE"]
    assert [row.split()[0] for row in table[1:5]] == ["relu", "none", "sigmoid", "tanh"]
    assert float(table[3].split()[2]) == pytest.approx(test_mae["sigmoid"], abs=1e-3)
    sweep_dir = jobs[0].parent
    assert f"sweep directory: {sweep_dir.relative_to(root)}" in stdout
    assert f"next: python -m housing_reg.report {sweep_dir.relative_to(root)}" in stdout
    assert "group 0: 4 jobs, 4 models, one task" in stdout + readme_sweep.stderr  # one fit
    assert not (sweep_dir / ".lock").exists()  # the sweep freed its directory


@pytest.mark.unit
def test_hparams_tab_lists_head_against_test_mae(make_cfg, tmp_path: Path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    train(make_cfg("head=sigmoid", *FAST, "data.batch_size=32"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["head"].string_value == "sigmoid"
    assert start.session_start_info.hparams["lr"].number_value == pytest.approx(1e-3)
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert "test/mae" in [m.name.tag for m in exp.experiment.metric_infos]


@pytest.mark.cli
def test_glob_sweeps_every_head(tmp_path: Path):
    conf_heads = Path(__file__).parents[1] / "conf" / "head"
    heads = sorted(p.stem for p in conf_heads.glob("*.yaml"))
    run_cli(
        "-m",
        "head=glob(*)",
        "trainer.max_epochs=1",
        "data.batch_size=128",
        "callbacks.progress_bar.refresh_rate=0",
        cwd=tmp_path,
    )
    swept = sorted(read_metrics(j)["head"] for j in job_dirs(tmp_path / "multirun"))
    assert swept == heads


@pytest.mark.unit
def test_unknown_head_fails_before_training_and_lists_the_valid_ones():
    """What `python -m housing_reg.train head=softmaxx` checks first (cli.start), before
    anything is composed or trained (tests/test_bad_input.py runs one such refusal)."""
    with pytest.raises(ConfigError) as e:
        check_choices(["head=softmaxx"])
    assert str(e.value).startswith("head=softmaxx is not an available option; choose one of: ")
    for head in ("none", "relu", "sigmoid", "tanh"):
        assert head in str(e.value)


@pytest.mark.unit
def test_metrics_json_is_plain_json(make_cfg, tmp_path: Path):
    train(make_cfg("trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0"))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 1
