"""What a job leaves behind, and the one reader of it.

A job directory holds, once the job has finished:
    metrics.json       status "ok", the summary numbers (mean over replicas, with their spread),
                       per-epoch means, the fully resolved config and library versions
    predictions.csv    y_true and y_pred (the replicas' mean) for every test row
    replicas.csv       one row per replica (its seed and final metrics)
    replicas.npz       per replica: test predictions and per-epoch curves
    checkpoints/last.ckpt, TensorBoard events (scalars, HPARAMS, a pred-vs-true image)
and failure.json instead of (or beside) metrics.json when a run failed: a failed retry never
overwrites a good result. Every file is written to a temporary name in the job directory and
renamed into place, so a reader never sees half a file and a full disk leaves no debris.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from housing_reg.stats import train_targets

METRICS = ("train/mae", "val/mae", "test/mae", "test/mse")
CHECKPOINT = Path("checkpoints") / "last.ckpt"


class RecordError(ValueError):
    """A job directory or checkpoint that cannot be used; the message says which and why."""


class JobRecorder(Checkpoint):
    """Records a job as it trains: per-epoch history, checkpoints, and the files above.

    A Checkpoint, so Lightning calls it after the model's own epoch-end hook: the epoch's
    metrics exist and the divergence check has passed, so a NaN model is never saved.
    Its state (history, fit time, the training config) travels inside each checkpoint, so a
    resumed job reports its whole curve and refuses settings it was not trained with.
    """

    def __init__(self, output_dir: str | Path, config: dict[str, Any], checkpoint_every: int = 1):
        self.dir = Path(output_dir)
        self.config = config
        self.checkpoint_every = checkpoint_every
        self.history: dict[str, list[list[float]]] = {"train/mae": [], "val/mae": []}
        self.fit_seconds: list[float] = []  # one entry per fit session; a resumed job has two+
        self.metrics: dict[str, Any] = {}  # metrics.json's contents, once the job has tested
        self._start = 0.0

    # -- state carried by checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._start
        return {
            "history": self.history,
            "fit_seconds": [*self.fit_seconds, elapsed],
            "config": training_settings(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.fit_seconds = state["history"], state["fit_seconds"]

    # -- during fit ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        self.fit_seconds.append(time.perf_counter() - self._start)

    def on_train_epoch_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        for name in self.history:
            if name in model.results:
                self.history[name].append(model.results[name].tolist())
        done = trainer.current_epoch + 1
        every = self.checkpoint_every
        if every and (done % every == 0 or done == trainer.max_epochs):
            path = self.dir / CHECKPOINT
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))

    # -- after test: the job's files -----------------------------------------------------------
    def on_test_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        r = model.results
        per_replica = {"train/mae": torch.tensor(self.history["train/mae"][-1])}
        if self.history["val/mae"]:
            per_replica["val/mae"] = torch.tensor(self.history["val/mae"][-1])
        per_replica |= {k: r[k] for k in ("test/mae", "test/mse")}
        pred, true = r["test/pred"].cpu(), r["test/true"].cpu()
        metrics = self.summary(trainer, model.seeds, per_replica)
        log_hparams(trainer, self.config, metrics)
        log_pred_vs_true(trainer, self.config, true, pred)
        write_predictions(self.dir / "predictions.csv", pred, true)
        write_replicas(self.dir, model.seeds, per_replica, pred, self.history)
        write_json(self.dir / "metrics.json", metrics)
        (self.dir / "failure.json").unlink(missing_ok=True)  # an earlier failure, now retried
        self.metrics = metrics

    def summary(
        self, trainer: L.Trainer, seeds: list[int], per_replica: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        c, data = self.config, trainer.datamodule
        metrics: dict[str, Any] = {
            "status": "ok",
            "head": c["head"]["name"],
            "dataset": data.dataset,
            "target": {"name": data.target_label, "unit": data.target_unit},
            "train_targets": train_targets(data),  # the report's answer.png
            "seed": c["seed"],
            "replicas": len(seeds),
            "target_scaling": c["data"]["target_scaling"],
            "fold": c["data"]["fold"] if c["data"]["num_folds"] else None,
            "lr": c["optim"]["lr"],
            "batch_size": c["data"]["batch_size"],
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "fit_seconds": round(sum(self.fit_seconds), 4),
            "fit_seconds_per_session": [round(s, 4) for s in self.fit_seconds],
        }
        metrics |= spread(per_replica)
        metrics["history"] = {
            k: [float(np.mean(epoch)) for epoch in v] for k, v in self.history.items()
        }
        metrics["config"] = c
        metrics["versions"] = {
            "python": platform.python_version(),
            **{p: version(p) for p in ("housing_reg", "torch", "lightning", "hydra-core", "numpy")},
        }
        return metrics


def spread(per_replica: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each metric over replicas, with std, min and max when there are several."""
    out = {}
    for name, t in per_replica.items():
        out[name] = t.mean().item()
        if len(t) > 1:
            out |= {
                f"{name}_std": t.std().item(),
                f"{name}_min": t.min().item(),
                f"{name}_max": t.max().item(),
            }
    return out


def training_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus what may change between a run and its resumption: how long to train,
    where output goes, how it is shown and how the job was (re)started."""
    free = ("output_dir", "resume", "ckpt_path", "checkpoint_every", "callbacks", "logger")
    settings = {k: v for k, v in config.items() if k not in free}
    trainer = config.get("trainer", {})
    settings["trainer"] = {
        k: v for k, v in trainer.items() if k not in ("max_epochs", "default_root_dir")
    }
    return settings


# -- TensorBoard extras --------------------------------------------------------------------
def log_hparams(trainer: L.Trainer, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """HPARAMS tab: the main settings against the final metrics, which the run logged."""
    from torch.utils.tensorboard.summary import hparams

    c = config
    hp = {
        "head": c["head"]["name"],
        "seed": c["seed"],
        "lr": c["optim"]["lr"],
        "optimizer": c["optim"]["_target_"].rsplit(".", 1)[-1],
        "batch_size": c["data"]["batch_size"],
        "max_epochs": c["trainer"]["max_epochs"],
        "hidden": "x".join(map(str, c["model"]["hidden"])),
        "replicas": c["model"]["replicas"],
        "target_scaling": c["data"]["target_scaling"],
    }
    if c["data"]["num_folds"]:  # without folds, data.fold means nothing: no "fold 0.0000" column
        hp["fold"] = c["data"]["fold"]
    names = [k for k in METRICS if k in metrics]
    writer = trainer.logger.experiment
    for summary in hparams(hp, {k: metrics[k] for k in names}):
        writer._get_file_writer().add_summary(summary)
    writer.flush()


def log_pred_vs_true(
    trainer: L.Trainer, config: dict[str, Any], true: torch.Tensor, pred: torch.Tensor
) -> None:
    """IMAGES tab: this job's test predictions against the truth, drawn once after testing."""
    from housing_reg.report import figure_rgb, pred_vs_true_figure  # matplotlib: only here

    c, r, data = config, len(pred), trainer.datamodule
    seeds = f"seed {c['seed']}" if r == 1 else f"seeds {c['seed']}-{c['seed'] + r - 1}"
    fold = f", fold {c['data']['fold']}" if c["data"]["num_folds"] else ""
    scaling = c["data"]["target_scaling"].replace("none", "unscaled")
    title = f"{data.dataset}: {c['head']['name']}, {scaling} targets, {seeds}{fold}"
    fig = pred_vs_true_figure(true, pred, title, data.target_label, data.target_unit)
    writer = trainer.logger.experiment
    # At the last optimizer step, like the test scalars (not at step 0, before any training).
    writer.add_image(
        "test/pred_vs_true", figure_rgb(fig), global_step=trainer.global_step, dataformats="HWC"
    )
    writer.flush()


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


def write_predictions(path: Path, pred: torch.Tensor, true: torch.Tensor) -> None:
    """Rows in order, in the target's units: the truth and the replicas' mean prediction."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["y_true", "y_pred"])
    rows = zip(true.tolist(), pred.mean(dim=0).tolist(), strict=True)
    w.writerows([f"{t:.6g}", f"{p:.6g}"] for t, p in rows)
    write_text(path, buf.getvalue())


def write_replicas(
    out: Path,
    seeds: list[int],
    per_replica: dict[str, torch.Tensor],
    pred: torch.Tensor,
    history: dict[str, list[list[float]]],
) -> None:
    """replicas.csv (one readable row per replica) and replicas.npz (its predictions and
    curves), so metrics.json and predictions.csv stay small at any number of replicas."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["seed", *per_replica])
    columns = [t.tolist() for t in per_replica.values()]
    w.writerows([s, *(repr(c[r]) for c in columns)] for r, s in enumerate(seeds))
    write_text(out / "replicas.csv", buf.getvalue())
    arrays = {"seed": np.array(seeds), "test_pred": pred.numpy()}
    arrays |= {k.replace("/", "_"): np.array(v) for k, v in history.items() if v}  # (E, R)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(out / "replicas.npz", save)


def write_failure(out: Path, status: str, error: BaseException, config: dict[str, Any]) -> None:
    """failure.json beside whatever the job already holds (a good metrics.json stays)."""
    record = {"status": status, "error": f"{type(error).__name__}: {error}", "config": config}
    write_json(out / "failure.json", record)


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


# -- the one reader --------------------------------------------------------------------------
@dataclass
class Job:
    """A job directory as written above."""

    path: Path
    status: str  # ok | failed | interrupted | incomplete | broken
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. a later retry failed while an earlier result stands

    def replicas(self) -> list[dict[str, Any]]:
        """Per replica: seed, final metrics, test predictions and per-epoch curves."""
        with open(self.path / "replicas.csv", newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        arrays = np.load(self.path / "replicas.npz")
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
    as a job starts, so this finds running jobs too, and skips evaluate's outputs."""
    found = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    return sorted(found, key=lambda p: [_natural(part) for part in p.relative_to(root).parts])


def _natural(name: str) -> tuple[int, str]:
    num = name.split("_", 1)[0]
    return (int(num) if num.isdigit() else -1, name)


def read_job(path: Path) -> Job:
    """What a job directory says about itself; never raises on bad contents."""
    metrics_file, failure_file = path / "metrics.json", path / "failure.json"
    failure = _load(failure_file)
    if metrics_file.exists():
        m = _load(metrics_file)
        if not isinstance(m, dict) or m.get("status") != "ok":
            return Job(path, "broken", "metrics.json is unreadable or not a finished run")
        note = ""
        if isinstance(failure, dict):
            note = f"a later retry failed ({failure.get('error')}); the earlier result stands"
        return Job(path, "ok", metrics=m, note=note)
    if isinstance(failure, dict):
        status = str(failure.get("status", "failed"))
        return Job(path, status, str(failure.get("error", "unknown error")))
    if failure_file.exists():
        return Job(path, "broken", "failure.json is unreadable")
    return Job(path, "incomplete", "no metrics.json (still running, or killed)")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents (tensors and plain data only), or one RecordError line."""
    if not path.is_file():
        raise RecordError(f"ckpt_path={path}: no such file; point it at JOB/{CHECKPOINT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message runs to many lines
        raise RecordError(
            f"{path}: not a housing_reg checkpoint (torch.load raised {type(e).__name__}); "
            f"point ckpt_path at a job's {CHECKPOINT}"
        ) from None
