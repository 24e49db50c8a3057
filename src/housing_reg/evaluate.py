"""Evaluate a checkpoint: `python -m housing_reg.evaluate ckpt_path=JOB/checkpoints/result.ckpt`.

The checkpoint carries everything needed: the settings it was trained with (data, split,
head), its input and target scalers and its feature names. On the job's own test split it
reproduces the job's predictions.csv exactly; on another CSV (data.path=..., columns matched
by name) it predicts in the target's own units, and without the target column it predicts
only. Every evaluation writes into a new directory of its own (output_path), so none replaces
another. Settings: conf/evaluate.yaml.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from housing_reg.argv import quote_paths
from housing_reg.csvfile import DIALECT
from housing_reg.data import EVAL_BATCH_SIZE, DataError, load_csv
from housing_reg.jobdir import RECORD, job_of, load_checkpoint, write_json
from housing_reg.model import Regressor, denormals_flushed, errors
from housing_reg.record import spread, write_predictions, write_replicas
from housing_reg.settings import USER_ERRORS, ConfigError, create

# What an evaluation writes; an explicit output_dir holding any of these, or a job's own
# failure.json or .hydra/, is refused: no evaluation replaces another, or a job's results.
RESULTS = ("predictions.csv", "replicas.csv", "replicas.npz", "metrics.json")
TAKEN = (*RESULTS, "failure.json", ".hydra")


@denormals_flushed()  # as in training, so the model predicts as it did when tested
def evaluate(
    ckpt_path: str | Path,
    data_path: str | None = None,
    output_dir: str | Path | None = None,
    delimiter: str | None = None,
    decimal: str | None = None,
) -> dict[str, Any]:
    """Predict with the checkpoint's model and write the results into a directory of their
    own (see output_path); returns metrics.json's contents and that directory. delimiter,
    decimal: data_path's, where they differ from those of the file the job trained on (its
    recorded data.delimiter and data.decimal)."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("callbacks", {}).get(RECORD, {}).get("config")
    if config is None:
        raise ConfigError(f"{ckpt_path} records no training settings; retrain with this version")
    model = load_model(ckpt, create(OmegaConf.create(config["head"]["activation"])))
    target = config["data"]["target"]
    rows = config["data"].get("eval_batch_size", EVAL_BATCH_SIZE)  # rows per chunk, as trained
    if data_path is None and (delimiter, decimal) != (None, None):
        raise ConfigError(
            "data.delimiter and data.decimal describe the CSV of data.path=...; the job's own "
            "test split is read as it was in training"
        )

    true: torch.Tensor | None
    if data_path is None:  # the job's own split, rebuilt exactly as in training
        saved = ckpt["callbacks"][RECORD].get("data_file")
        node = dict(config["data"])
        if saved and node.get("path") is not None:
            node["path"] = saved["path"]  # the file it was trained on, from anywhere
        data = create(OmegaConf.create(node))
        data.setup("test")
        if saved and data.file["sha256"] != saved["sha256"]:
            raise DataError(
                f"{data.file['path']} has changed since {ckpt_path} was trained on it "
                f"(SHA-256 {saved['sha256'][:12]}... then, {data.file['sha256'][:12]}... now): "
                "its test split cannot be rebuilt, so the job's test MAE cannot be reproduced; "
                "to evaluate the model on the file as it is now, pass data.path="
                f"{data.file['path']}"
            )
        x, y = data.splits["test"]
        pred, true = model.predict(x, rows), model.unscale(y).squeeze(-1)
        name, source = "test_split", f"test split of {config['data']['path'] or 'the bundled data'}"
    else:  # every row; without the target column, predictions only
        trained = DIALECT | config["data"]  # older jobs lack them
        dialect = {
            "delimiter": trained["delimiter"] if delimiter is None else delimiter,
            "decimal": trained["decimal"] if decimal is None else decimal,
        }
        table = load_csv(
            data_path, target, model.hparams.features, True, need_target=False, **dialect
        )
        x = model.scale_inputs(torch.from_numpy(table.x))
        beyond = [
            f for f, ok in zip(table.features, torch.isfinite(x).all(0), strict=True) if not ok
        ]
        if beyond:
            raise DataError(
                f"{data_path}: column(s) {', '.join(beyond)} hold values that, scaled with the "
                "training rows' statistics, lie beyond float32's range; drop those rows"
            )
        pred = model.predict(x, rows)
        true = None if table.y is None else torch.from_numpy(table.y).float()
        name, source = Path(data_path).name, str(data_path)

    per_replica = {} if true is None else errors(pred, true, rows)
    metrics = {
        "status": "ok",
        "ckpt_path": str(ckpt_path),
        "data": source,
        "rows": pred.shape[-1],
        "head": config["head"]["name"],
        "target": target,
        "predictions_only": true is None,  # no target column in the data: no MAE
        **spread(per_replica),
    }
    out, made = output_path(ckpt_path, name, output_dir)
    try:
        write_predictions(out / "predictions.csv", pred, true)
        write_replicas(out, model.seeds, per_replica, pred, {})
        write_json(out / "metrics.json", metrics)
    except OSError as e:  # a full disk: leave no half an evaluation behind
        for result in RESULTS:
            with contextlib.suppress(OSError):
                (out / result).unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise ConfigError(unwritable(out, e, output_dir)) from None
    return metrics | {"output_dir": str(out.absolute())}


def output_path(ckpt_path: Path, name: str, output_dir: str | Path | None) -> tuple[Path, bool]:
    """A directory for this evaluation alone, claimed (created, or its metrics.json created)
    so that no other evaluation can take it; and whether it was created here.

    By default JOB/evaluate/<checkpoint>_on_<data> for a checkpoint in a job directory, else
    outputs/evaluate/<date>/<time>_<checkpoint>_on_<data> under the working directory (as a
    run's outputs/<date>/<time>); _2, _3, ... where that name is taken. An explicit
    output_dir that already holds results (TAKEN) is refused."""
    if output_dir:
        return claim_given(Path(output_dir))
    leaf = f"{ckpt_path.stem[:100]}_on_{name[:100]}"
    job = job_of(ckpt_path)
    if job is not None:
        base = job / "evaluate"
    else:
        now = time.localtime()
        base = Path("outputs") / "evaluate" / time.strftime("%Y-%m-%d", now)
        leaf = time.strftime("%H-%M-%S_", now) + leaf
    try:
        base.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            out = base / (leaf if n == 1 else f"{leaf}_{n}")
            try:
                out.mkdir()  # fails where another evaluation, even one running now, has it
            except FileExistsError:
                continue
            return out, True
    except OSError as e:
        raise ConfigError(unwritable(base, e, None)) from None


def claim_given(out: Path) -> tuple[Path, bool]:
    """output_dir=DIR: created, or an existing directory that holds no results yet."""
    try:
        out.mkdir(parents=True)
        made = True
    except FileExistsError:
        made = False
    except OSError as e:
        raise ConfigError(unwritable(out, e, out)) from None
    held = [n for n in TAKEN if (out / n).exists()]
    try:
        if not held:  # created, not opened: two evaluations into one directory cannot both
            os.close(os.open(out / "metrics.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        held = ["metrics.json"]
    except OSError as e:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise ConfigError(unwritable(out, e, out)) from None
    if held:
        raise ConfigError(
            f"output_dir={out} already holds {held[0]} (an earlier evaluation, or a job's "
            "results) and is never overwritten; choose a new output_dir, or leave it out "
            "for a directory of its own"
        )
    return out, made


def unwritable(path: Path, e: OSError, output_dir: str | Path | None) -> str:
    """The one line for a directory evaluate cannot write to, and the way out."""
    way_out = (
        "choose another output_dir" if output_dir else "pass output_dir=DIR to write elsewhere"
    )
    # mkdir(exist_ok=True) raises FileExistsError where a file has the directory's name
    reason = "not a directory" if isinstance(e, FileExistsError) else e.strerror
    return f"cannot write to {path} ({reason or type(e).__name__}); {way_out}"


def load_model(ckpt: dict[str, Any], head: torch.nn.Module) -> Regressor:
    """Rebuild the Regressor from a checkpoint's hyperparameters and tensors only."""
    hp = ckpt["hyper_parameters"]
    n = hp["num_features"]  # buffers must have their saved shapes before loading
    model = Regressor(head, None, x_shift=torch.zeros(n), x_scale=torch.ones(n), **hp)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@hydra.main(version_base="1.3", config_path="pkg://housing_reg.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        d = cfg.data
        m = evaluate(cfg.ckpt_path, d.path, cfg.output_dir, d.delimiter, d.decimal)
    except MissingMandatoryValue:
        sys.exit("error: ckpt_path=... is required, e.g. ckpt_path=JOB/checkpoints/result.ckpt")
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    if m["predictions_only"]:
        print(
            f"{m['data']}: predictions only (no {m['target']} column, no MAE) for {m['rows']} rows"
        )
    else:
        print(f"{m['data']}: mae {m['mae']:.4f}, mse {m['mse']:.4f} on {m['rows']} rows")
    print(f"wrote {m['output_dir']}/predictions.csv and metrics.json")


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    main()
