"""`--help` says what the package is and how to use it before Hydra's generic part."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.cli


def test_train_help_starts_with_the_package_and_its_three_commands(tmp_path: Path):
    out = run_cli("--help", cwd=tmp_path).stdout
    lines = out.splitlines()
    assert lines[0].startswith("housing_reg: why is a regressor's error terrible with a sigmoid")
    commands = [line.split("#")[0].split() for line in lines[:12] if "python -m" in line]
    assert [c[:3] for c in commands] == [
        ["python", "-m", "housing_reg.train"],
        ["python", "-m", "housing_reg.report"],
        ["python", "-m", "housing_reg.evaluate"],
    ]
    assert "head=relu,none,sigmoid,tanh" in commands[0]
    # Then Hydra's groups (every head listed) and the config.
    groups = out.index("== Configuration groups ==")
    assert out.index("head: leaky_relu, none, relu, sigmoid, softplus, tanh") > groups
    assert out.index("== Config ==") > groups
    assert "max_epochs: 7" in out
    assert not (tmp_path / "outputs").exists()  # --help trains nothing


def test_evaluate_help_starts_with_what_it_does(tmp_path: Path):
    out = run_cli("--help", cwd=tmp_path, module="housing_reg.evaluate").stdout
    lines = out.splitlines()
    assert lines[0].startswith("housing_reg.evaluate: test a checkpoint")
    assert "python -m housing_reg.evaluate ckpt_path=" in "\n".join(lines[:6])
    assert "ckpt_path: ???" in out
