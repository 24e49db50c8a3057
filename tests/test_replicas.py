"""model.replicas=R: R independent models in one job, each equal to its own lone run. (Jobs
in forked processes, hydra/launcher=parallel: test_fuse.py's test_fused_groups_run_under_...)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from housing_reg.train import train

from conftest import FAST, replicas, scalars

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "validation",
    [("data.val_fraction=0.2",), ("data.num_folds=2", "data.fold=1", "data.batch_size=32")],
)
def test_replica_equals_a_lone_run_with_its_seed(make_cfg, tmp_path: Path, validation):
    """Replica 2 of a job with seed 10 is the lone run with seed 12, numbers and all: with a
    validation fraction, and on a fold (where the report counts a (fold, seed) that two jobs
    trained once, trusting them to agree)."""
    many = train(
        make_cfg(*FAST, "model.replicas=3", "seed=10", *validation, output_dir=tmp_path / "many")
    )
    lone = train(make_cfg(*FAST, "seed=12", *validation, output_dir=tmp_path / "lone"))
    per_replica = replicas(tmp_path / "many")
    third = per_replica[2]
    assert third["seed"] == 12
    for key in ("train/mae", "val/mae", "test/mae", "test/mse"):
        assert third[key] == pytest.approx(lone[key], rel=1e-4), key
    # Different seeds really are different models.
    assert per_replica[0]["test/mae"] != pytest.approx(third["test/mae"], rel=1e-4)
    # Summary numbers are the replica mean and spread, also in TensorBoard.
    maes = [r["test/mae"] for r in per_replica]
    assert many["test/mae"] == pytest.approx(sum(maes) / 3)
    assert many["test/mae_std"] > 0
    tb = scalars(tmp_path / "many")
    assert tb["test/mae"][-1] == pytest.approx(many["test/mae"], rel=1e-6)
    assert tb["test/mae_std"][-1] == pytest.approx(many["test/mae_std"], rel=1e-5)
    assert tb["test/mae_min"][-1] == pytest.approx(min(maes), rel=1e-6)
    # predictions.csv holds the replicas' mean; replicas.npz each replica's own predictions.
    header = (tmp_path / "many" / "predictions.csv").read_text().splitlines()[0]
    assert header == "y_true,y_pred"
    assert np.load(tmp_path / "many" / "replicas.npz")["test_pred"].shape == (3, 102)


def test_blocks_train_exactly_like_single_steps(make_cfg, tmp_path: Path):
    """steps_per_block only changes how steps are handed to Lightning, not the training."""
    common = (*FAST, "data.batch_size=3", "model.replicas=2")
    one = train(make_cfg(*common, "data.steps_per_block=1", output_dir=tmp_path / "one"))
    block = train(make_cfg(*common, "data.steps_per_block=7", output_dir=tmp_path / "seven"))
    assert block["steps"] == one["steps"] == 2 * 135
    assert replicas(tmp_path / "seven") == replicas(tmp_path / "one")
    assert block["history"] == one["history"]
