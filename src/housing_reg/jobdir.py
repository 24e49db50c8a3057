"""What a job directory holds, the one reader of it, and its atomic writes.

record.py writes a job directory during training, report.py, sweep.py and evaluate read it; all
import this module, which imports neither of them (nor Lightning).

A job directory holds, once the job has finished:
    metrics.json       status "ok", the summary numbers (mean over replicas, with their spread),
                       per-epoch means, the fully resolved config and library versions
    predictions.csv    y_true and y_pred (the replicas' mean) for every test row
    replicas.csv       one row per replica (its seed and final metrics)
    replicas.npz       per replica: test predictions and per-epoch curves
    checkpoints/result.ckpt  the model metrics.json describes (what evaluate reads)
    checkpoints/last.ckpt    the latest whole epoch, where resume=true continues
    TensorBoard events (scalars, HPARAMS, a pred-vs-true image)
    evaluate/          once evaluated: one directory per evaluation (evaluate.py writes them)
and failure.json instead of (or beside) metrics.json when a run failed: a failed or
interrupted retry never overwrites a good result, nor the checkpoint behind it. Every file is
written to a temporary name in the job directory and renamed into place, so a reader never
sees half a file and a full disk leaves no debris.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from housing_reg.csvfile import DIALECT

METRICS = ("train/mae", "val/mae", "test/mae", "test/mse")
CHECKPOINT = Path("checkpoints") / "last.ckpt"  # the resume point: rewritten every epoch
# The model behind metrics.json: written as the job finishes, just before metrics.json, and
# kept when a later retry (resume=true trainer.max_epochs=...) moves last.ckpt on.
RESULT_CHECKPOINT = Path("checkpoints") / "result.ckpt"
# A job checkpoint's record of its job (record.JobRecorder's state: its settings, data file and
# history), under ckpt["callbacks"][RECORD]: what resume=true and evaluate check.
RECORD = "JobRecorder"
# A fused sweep's group tasks: SWEEP/.fused/K holds group K's job configs and its task's log,
# never a job of the sweep (group.py).
GROUPS = ".fused"


class RecordError(ValueError):
    """A job directory or checkpoint that cannot be used; the message says which and why."""


# Config keys that are bookkeeping, not settings: where a job writes, how it is shown, how it
# was (re)started. A resumed job may change them (jobdir.training_settings), the report never
# groups by them, a sweep's directory names leave them out (conf/config.yaml's exclude_keys,
# checked against this list by tests/test_layout.py), and a fused sweep keeps them per job
# (fuse.py). Dotted entries name a key inside a group.
BOOKKEEPING = (
    "output_dir",
    "resume",
    "ckpt_path",
    "checkpoint_every",
    "callbacks",
    "logger",
    "fuse",
    "trainer.default_root_dir",
)


def is_bookkeeping(key: str) -> bool:
    """key (dotted, e.g. callbacks.progress_bar.refresh_rate) is or lies under BOOKKEEPING."""
    return any(key == b or key.startswith(b + ".") for b in BOOKKEEPING)


# -- files -----------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp) beside path, then rename over it: readers see the old file or the new one,
    and a failed write (a full disk) leaves neither a partial file nor the temporary one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_copy(path: Path, source: Path) -> None:
    """path holds source's bytes, atomically: a hard link where the file system allows one
    (no second copy on disk), else a copy. A link stays these bytes: every file here is
    replaced by renaming a new one over it, never rewritten in place."""

    def link(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    write_atomic(path, link)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Strict JSON (NaN and infinities become null), written atomically."""
    write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_failure(
    out: Path, status: str, error: BaseException, config: dict[str, Any], retry: bool = True
) -> None:
    """failure.json beside whatever the job already holds (a good metrics.json stays). retry:
    whether running it again might end otherwise (not for refused settings or a diverged
    fit); the sweep's summary offers the rerun command only then."""
    record = {"status": status, "error": f"{type(error).__name__}: {error}", "config": config}
    write_json(out / "failure.json", record | {"retry": retry})


# -- the one reader ------------------------------------------------------------------------
@dataclass
class JobState:
    """What a job directory says about itself: its status and, once finished, its metrics."""

    path: Path
    # ok | failed | interrupted | incomplete | broken, or a Slurm state in lower case
    # (cancelled, timeout, out_of_memory, node_fail, ...) for a job Slurm ended (slurm.py)
    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. a later retry failed while an earlier result stands
    retry: bool = True  # whether running it again might end otherwise (write_failure)

    def replicas(self) -> list[dict[str, Any]]:
        """Per replica: seed, final metrics, test predictions and per-epoch curves."""
        with open(self.path / "replicas.csv", newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        with np.load(self.path / "replicas.npz") as npz:
            # Each npz[key] reads and parses the whole array again: read each one once.
            arrays = {k: npz[k] for k in ("test_pred", "train_mae", "val_mae") if k in npz}
        for r, row in enumerate(rows):
            row["seed"] = int(row["seed"])
            row["test_pred"] = arrays["test_pred"][r]
            row["curves"] = {
                k: arrays[k.replace("/", "_")][:, r].tolist()
                for k in ("train/mae", "val/mae")
                if k.replace("/", "_") in arrays
            }
        return rows


def find_jobs(root: Path) -> list[Path]:
    """Every job directory under root (root included), in sweep order: Hydra writes .hydra/
    as a job starts, so this finds running jobs too, and skips evaluate's outputs and the
    group tasks of a fused sweep (a lost one gets a .hydra/ record of its own)."""
    found = {
        p.parent
        for p in root.rglob(".hydra")
        if p.is_dir() and GROUPS not in p.relative_to(root).parts
    }
    return sorted(found, key=lambda p: [_natural(part) for part in p.relative_to(root).parts])


def _natural(name: str) -> tuple[int, str]:
    num = name.split("_", 1)[0]
    return (int(num) if num.isdigit() else -1, name)


def read_state(path: Path) -> JobState:
    """What a job directory says about itself; never raises on bad contents."""
    metrics_file, failure_file = path / "metrics.json", path / "failure.json"
    failure = _load(failure_file)
    if metrics_file.exists():
        m = _load(metrics_file)
        if not isinstance(m, dict) or m.get("status") != "ok":
            return JobState(path, "broken", "metrics.json is unreadable or not a finished run")
        note = ""
        if isinstance(failure, dict):  # failed, or interrupted (whose last.ckpt moved on)
            how = "was interrupted" if failure.get("status") == "interrupted" else "failed"
            note = f"a later retry {how} ({failure.get('error')}); the earlier result stands"
        return JobState(path, "ok", metrics=m, note=note)
    if isinstance(failure, dict):
        status = str(failure.get("status", "failed"))
        error = str(failure.get("error", "unknown error"))
        return JobState(path, status, error, retry=failure.get("retry", True) is not False)
    if failure_file.exists():
        return JobState(path, "broken", "failure.json is unreadable")
    return JobState(path, "incomplete", "no metrics.json (still running, or killed)")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def job_of(ckpt: Path) -> Path | None:
    """The job directory a checkpoint lies in (JOB/checkpoints/NAME.ckpt, JOB holding .hydra/
    or metrics.json), or None for a checkpoint kept anywhere else (a copy in /tmp)."""
    folder = ckpt.resolve().parent
    if folder.name != CHECKPOINT.parent.name:
        return None
    job = folder.parent
    return job if (job / ".hydra").is_dir() or (job / "metrics.json").is_file() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents (tensors and plain data only), or one RecordError line."""
    if not path.is_file():
        raise RecordError(f"ckpt_path={path}: no such file; point it at JOB/{CHECKPOINT}")
    try:
        import torch  # here: fuse.py imports this module at Hydra's plugin scan

        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message runs to many lines
        raise RecordError(
            f"{path}: not a housing_reg checkpoint (torch.load raised {type(e).__name__}); "
            f"point ckpt_path at a job's {CHECKPOINT}"
        ) from None


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """What a table (the sweep's summary, the report's) calls each setting: head.name -> head,
    optim.lr -> lr, optim._target_ -> optim, hydra/launcher -> launcher; the full key where
    two short names would collide."""

    def short(k: str) -> str:
        if k == "head.name":
            return "head"
        if k.endswith("._target_"):
            return k.rsplit(".", 2)[-2]
        return k.rsplit(".", 1)[-1].rsplit("/", 1)[-1]

    names = [short(k) for k in keys]
    return {k: n if names.count(n) == 1 else k for k, n in zip(keys, names, strict=True)}


def training_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus what may change between a run and its resumption: how long to train,
    where output goes, how it is shown and how the job was (re)started."""
    settings = {k: v for k, v in config.items() if not is_bookkeeping(k)}
    if isinstance(settings.get("data"), dict):  # a file read as ever: older jobs lack these
        defaults = DIALECT
        settings["data"] = {
            k: v for k, v in settings["data"].items() if k not in defaults or v != defaults[k]
        }
    if isinstance(settings.get("head"), dict):  # head.range describes the head, and older
        settings["head"] = {k: v for k, v in settings["head"].items() if k != "range"}  # lack it
    trainer = config.get("trainer", {})
    settings["trainer"] = {
        k: v
        for k, v in trainer.items()
        if k != "max_epochs"
        and not is_bookkeeping(f"trainer.{k}")
        and (k, v) != ("precision", "32-true")  # the default, which older jobs do not name
    }
    return settings
