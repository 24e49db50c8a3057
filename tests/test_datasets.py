"""The bundled data sets: their files match their data cards, and the data settings name them,
their targets and units the way jobs record them in metrics.json."""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from housing_reg.data import BOSTON_CSV, BUNDLED, DataError, keras_split

from conftest import set_up

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DATASETS = BOSTON_CSV.parent


def card_sha256(name: str) -> str:
    """The sha256 that docs/data.md gives for datasets/<name>.csv."""
    card = (ROOT / "docs" / "data.md").read_text().split(f"\n## {name}\n", 1)[1]
    return re.search(r"\| sha256 \| `([0-9a-f]{64})` \|", card).group(1)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_file_matches_its_data_card(name: str):
    path = DATASETS / BUNDLED[name][0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card_sha256(name)
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    line = re.search(r'^"housing_reg" = \[(.*)\]$', pyproject, re.M).group(1)
    patterns = [p.strip().strip('"') for p in line.split(",")]
    assert any(fnmatch.fnmatch(f"datasets/{path.name}", p) for p in patterns)  # in the wheel


def test_diabetes_file_is_the_lars_data():
    with open(DATASETS / "diabetes.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], np.array(rows[1:], dtype=float)
    assert header == ["AGE", "SEX", "BMI", "BP", *(f"S{i}" for i in range(1, 7)), "progression"]
    assert body.shape == (442, 11)
    y = body[:, -1]
    assert (y.min(), y.max(), y.sum()) == (25, 346, 67243)  # whole numbers, mean 152.13
    assert set(body[:, 1]) == {1, 2}  # SEX, raw coding
    assert body[0].tolist() == [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87, 151]
    train, test = keras_split(442)
    assert (len(train), len(test)) == (353, 89)
    assert y[test].mean() == pytest.approx(156.2247, abs=1e-4)  # a head stuck at 1: MAE 155.22


def test_data_settings_name_the_data_target_and_unit(tmp_path: Path):
    boston = set_up()
    assert (boston.dataset, boston.target_label, boston.target_unit) == ("boston", "MEDV", "$1000s")
    diabetes = set_up(name="diabetes", target="progression")
    assert (diabetes.dataset, diabetes.target_label, diabetes.target_unit) == (
        "diabetes", "progression", ""
    )  # fmt: skip
    assert diabetes.num_features == 10 and len(diabetes.splits["test"][1]) == 89
    own = tmp_path / "my_lab.csv"
    own.write_text((DATASETS / "diabetes.csv").read_text())
    mine = set_up(path=str(own), target="BMI")
    assert (mine.dataset, mine.target_label, mine.target_unit) == ("my_lab", "BMI", "")
    named = set_up(path=str(own), target="BMI", target_label="body mass", target_unit="kg/m²")
    assert (named.target_label, named.target_unit) == ("body mass", "kg/m²")
    with pytest.raises(DataError, match="data.name='iris': choose one of boston, diabetes"):
        set_up(name="iris")


def test_diabetes_config_splits_like_boston(make_cfg):
    boston, diabetes = make_cfg().data, make_cfg("data=diabetes").data
    assert (diabetes.name, diabetes.target, diabetes.path) == ("diabetes", "progression", None)
    assert (boston.name, boston.target, boston.target_unit) == ("boston", "MEDV", None)
    same = {k: v for k, v in boston.items() if k not in ("name", "target")}
    assert {k: diabetes[k] for k in same} == same  # test_split 0.2, split_seed 113, ...
