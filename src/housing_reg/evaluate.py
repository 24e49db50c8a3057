"""Evaluate a checkpoint: `python -m housing_reg.evaluate ckpt_path=JOB/checkpoints/last.ckpt`.

Settings, in train's key=value style:
  ckpt_path=PATH    the checkpoint (required); its job directory's .hydra/config.yaml says which
                    data, split and head it was trained with
  data.path=CSV     evaluate on every row of this CSV (same feature and target columns) instead
                    of the job's own test split
  output_dir=DIR    where predictions.csv and metrics.json go
                    (default: JOB/evaluate/test, or JOB/evaluate/<CSV name>)

The model carries its input and target scalers as buffers, so predictions come out in the
target's own units; on the job's test split they reproduce its test/mae exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchmetrics.functional import mean_absolute_error, mean_squared_error

from housing_reg.data import DataError, load_csv
from housing_reg.model import Regressor, per_replica
from housing_reg.train import ConfigError, create, write_json, write_predictions

KEYS = ("ckpt_path", "data.path", "output_dir")


def evaluate(
    ckpt_path: str | Path, data_path: str | None = None, output_dir: str | Path | None = None
) -> dict[str, Any]:
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no such file; point it at JOB/checkpoints/last.ckpt"
        )
    job = ckpt_path.resolve().parent.parent  # JOB/checkpoints/last.ckpt
    cfg_file = job / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(
            f"{cfg_file} not found; ckpt_path must lie in the checkpoints/ folder of the job "
            "directory that wrote it"
        )
    cfg = OmegaConf.load(cfg_file)
    cfg.output_dir = str(job)  # was ${hydra:runtime.output_dir}
    model = load_model(ckpt_path, instantiate(cfg.head.activation))

    if data_path is None:  # the job's own split, rebuilt exactly as in training
        data = create(cfg.data)
        with torch.no_grad():
            pred, true = model.predict_split(data.splits["test"])
            true = true[0]
        name, source = "test", f"test split of {cfg.data.path or 'the bundled boston.csv'}"
    else:
        table = load_csv(data_path, cfg.data.target, model.hparams.features, allow_constant=True)
        pred = model.predict_raw(torch.from_numpy(table.x))
        true = torch.from_numpy(table.y).float()
        name, source = Path(data_path).stem, str(data_path)

    out = Path(output_dir) if output_dir else job / "evaluate" / name
    out.mkdir(parents=True, exist_ok=True)
    mae = per_replica(mean_absolute_error, pred, true.expand_as(pred))
    mse = per_replica(mean_squared_error, pred, true.expand_as(pred))
    metrics = {
        "status": "ok",
        "ckpt_path": str(ckpt_path),
        "data": source,
        "rows": len(true),
        "head": cfg.head.name,
        "mae": mae.mean().item(),
        "mse": mse.mean().item(),
        "per_replica": [
            {"seed": s, "mae": a, "mse": b}
            for s, a, b in zip(model.hparams.seeds, mae.tolist(), mse.tolist(), strict=True)
        ],
    }
    write_predictions(out / "predictions.csv", pred, true)
    write_json(out / "metrics.json", metrics)
    metrics["output_dir"] = str(out)
    return metrics


def load_model(ckpt_path: Path, head: torch.nn.Module) -> Regressor:
    """Rebuild the Regressor from a checkpoint's hyperparameters and tensors only."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        hp = ckpt["hyper_parameters"]
    except Exception as e:
        raise ConfigError(f"{ckpt_path}: not a readable checkpoint ({e})") from None
    n = hp["num_features"]  # buffers must have their saved shapes before loading
    model = Regressor(
        head=head, optimizer=None, x_shift=torch.zeros(n), x_scale=torch.ones(n), **hp
    )
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)
    return model.eval()


def parse_args(args: list[str]) -> dict[str, str]:
    settings = {}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"{a!r}: expected key=value with key one of {', '.join(KEYS)}")
        settings[key] = value
    if "ckpt_path" not in settings:
        raise ConfigError("ckpt_path=... is required, e.g. ckpt_path=JOB/checkpoints/last.ckpt")
    return settings


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return
    try:
        s = parse_args(args)
        m = evaluate(s["ckpt_path"], s.get("data.path"), s.get("output_dir"))
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    print(f"{m['data']}: mae {m['mae']:.4f}, mse {m['mse']:.4f} on {m['rows']} rows")
    print(f"wrote {m['output_dir']}/predictions.csv and metrics.json")


if __name__ == "__main__":
    main()
