"""The configs resolve from a wheel installed into a fresh venv, far from the source tree."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.cli

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_trains_outside_the_repo(tmp_path: Path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",  # shows setuptools' own warnings
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        text=True,
        capture_output=True,
    )
    # A conf/ folder missing from pyproject's `packages` list: setuptools warns on every
    # `pip install -e`, and would stop shipping it.
    assert "is absent from the `packages` configuration" not in build.stdout + build.stderr
    wheel = next(dist.glob("housing_reg-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    conf = {
        f"housing_reg/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert conf <= shipped, sorted(conf - shipped)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        text=True,
        capture_output=True,
    )
    new_site = Path(purelib.stdout.strip())
    # Dependencies (torch, lightning, ...) come from the test's environment, appended after the
    # fresh venv's own site-packages; its .pth files (the editable install) are not processed.
    (new_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(new_site),
            str(wheel),
        ],
        check=True,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import housing_reg; print(housing_reg.__file__)"],
        cwd=work,
        check=True,
        text=True,
        capture_output=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv)
    proc = subprocess.run(
        [
            python,
            "-m",
            "housing_reg.train",
            "trainer.max_epochs=1",
            "hydra.run.dir=job",
            "callbacks.progress_bar.refresh_rate=0",
        ],
        cwd=work,
        text=True,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Installed, src/hydra_plugins is in Hydra's plugin scan, which imports each module of it
    # (hydra_plugins/housing_reg_launcher/slurm.py with or without the `slurm` extra).
    assert "Hydra plugins scanner" not in proc.stderr and "Error importing" not in proc.stderr
    assert (work / "job" / "metrics.json").exists()
    assert (work / "job" / ".hydra" / "config.yaml").exists()
