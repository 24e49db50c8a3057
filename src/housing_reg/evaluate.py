"""Evaluate a checkpoint: `python -m housing_reg.evaluate ckpt_path=JOB/checkpoints/result.ckpt`.

The checkpoint carries everything needed: the settings it was trained with (data, split,
head), its input and target scalers and its feature names. On the job's own test split it
reproduces the job's predictions.csv exactly; on another CSV (data.path=..., columns matched
by name) it predicts in the target's own units. Settings: conf/evaluate.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from housing_reg.cli import quote_paths
from housing_reg.data import DataError, load_csv
from housing_reg.jobdir import load_checkpoint, write_json
from housing_reg.model import Regressor, mae, mse
from housing_reg.record import JobRecorder, spread, write_predictions, write_replicas
from housing_reg.settings import USER_ERRORS, ConfigError, create


def evaluate(
    ckpt_path: str | Path, data_path: str | None = None, output_dir: str | Path | None = None
) -> dict[str, Any]:
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("callbacks", {}).get(JobRecorder.__qualname__, {}).get("config")
    if config is None:
        raise ConfigError(f"{ckpt_path} records no training settings; retrain with this version")
    model = load_model(ckpt, create(OmegaConf.create(config["head"]["activation"])))

    if data_path is None:  # the job's own split, rebuilt exactly as in training
        saved = ckpt["callbacks"][JobRecorder.__qualname__].get("data_file")
        node = dict(config["data"])
        if saved and node.get("path") is not None:
            node["path"] = saved["path"]  # the file it was trained on, from anywhere
        data = create(OmegaConf.create(node))
        if saved and data.file["sha256"] != saved["sha256"]:
            raise DataError(
                f"{data.file['path']} has changed since {ckpt_path} was trained on it "
                f"(SHA-256 {saved['sha256'][:12]}... then, {data.file['sha256'][:12]}... now): "
                "its test split cannot be rebuilt, so the job's test MAE cannot be reproduced; "
                "to evaluate the model on the file as it is now, pass data.path="
                f"{data.file['path']}"
            )
        with torch.no_grad():
            pred, true = model.predict_split(data.splits["test"])
        true = true[0]
        name, source = "test", f"test split of {config['data']['path'] or 'the bundled data'}"
    else:
        table = load_csv(data_path, config["data"]["target"], model.hparams.features, True)
        x = model.scale_inputs(torch.from_numpy(table.x))
        beyond = [
            f for f, ok in zip(table.features, torch.isfinite(x).all(0), strict=True) if not ok
        ]
        if beyond:
            raise DataError(
                f"{data_path}: column(s) {', '.join(beyond)} hold values that, scaled with the "
                "training rows' statistics, lie beyond float32's range; drop those rows"
            )
        with torch.no_grad():
            pred = model.unscale(model(x)).squeeze(-1)
        true = torch.from_numpy(table.y).float()
        name, source = Path(data_path).stem, str(data_path)

    job = ckpt_path.resolve().parent.parent  # JOB/checkpoints/result.ckpt
    out = Path(output_dir) if output_dir else job / "evaluate" / name
    out.mkdir(parents=True, exist_ok=True)
    per_replica = {"mae": mae(pred, true.expand_as(pred)), "mse": mse(pred, true.expand_as(pred))}
    metrics = {
        "status": "ok",
        "ckpt_path": str(ckpt_path),
        "data": source,
        "rows": len(true),
        "head": config["head"]["name"],
        **spread(per_replica),
    }
    write_predictions(out / "predictions.csv", pred, true)
    write_replicas(out, model.seeds, per_replica, pred, {})
    write_json(out / "metrics.json", metrics)
    return metrics | {"output_dir": str(out)}


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
        m = evaluate(cfg.ckpt_path, cfg.data.path, cfg.output_dir)
    except MissingMandatoryValue:
        sys.exit("error: ckpt_path=... is required, e.g. ckpt_path=JOB/checkpoints/result.ckpt")
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    print(f"{m['data']}: mae {m['mae']:.4f}, mse {m['mse']:.4f} on {m['rows']} rows")
    print(f"wrote {m['output_dir']}/predictions.csv and metrics.json")


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    main()
