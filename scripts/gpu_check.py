"""GPU readiness: the same jobs on CUDA (trainer.accelerator=auto) and on the CPU.

    python scripts/gpu_check.py [--out gpu_check.json] [--tolerance 0.03]

1. Agreement: one job (head=none, seed 0, the default 7 epochs at batch size 1) and one with
   4 replicas, each on the CPU and with accelerator=auto; test MAE must agree within a relative
   tolerance (float32 sums run in another order on the GPU, so the trajectories drift apart a
   little, step by step).
2. Speed: replicas=1 vs replicas=100 on each device, in microseconds per optimizer step and per
   model-step (step time / replicas), after a warm-up job.
Prints a table, writes JSON, exits 1 if a GPU result disagrees with the CPU. Without CUDA it
runs the CPU half and says so; the package never needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import torch
from hydra import compose, initialize_config_module

from housing_reg.jobdir import read_state
from housing_reg.train import train

QUIET = ["callbacks.progress_bar.refresh_rate=0"]
AGREEMENT = {"plain": ["model.replicas=1"], "replicas": ["model.replicas=4"]}
SPEED_EPOCHS = 3


def run(device: str, *extra: str) -> dict[str, Any]:
    """One real job through train(cfg); device 'cpu' or 'auto' (a GPU where there is one)."""
    with tempfile.TemporaryDirectory() as out:
        with initialize_config_module("housing_reg.conf", version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[f"output_dir={out}", f"trainer.accelerator={device}", *QUIET, *extra],
            )
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        metrics = train(cfg)
        job = read_state(Path(out))
        metrics["per_replica"] = job.replicas()  # seed, test/mae, curves, ... per replica
    # Where the job ran: it allocated CUDA memory or it did not.
    metrics["on_gpu"] = cuda and torch.cuda.max_memory_allocated() > before
    return metrics


def agreement(tolerance: float, gpu: bool) -> list[dict[str, Any]]:
    rows = []
    for name, overrides in AGREEMENT.items():
        cpu = run("cpu", *overrides)
        row: dict[str, Any] = {
            "job": name,
            "replicas": cpu["replicas"],
            "cpu_test_mae": [r["test/mae"] for r in cpu["per_replica"]],
            "cpu_on_gpu": cpu["on_gpu"],
        }
        if gpu:
            auto = run("auto", *overrides)
            gpu_mae = [r["test/mae"] for r in auto["per_replica"]]
            rel = max_rel_diff(row["cpu_test_mae"], gpu_mae)
            row.update(
                gpu_test_mae=gpu_mae,
                auto_picked_gpu=auto["on_gpu"],
                max_rel_diff=rel,
                # After one epoch the two runs have had less time to drift apart.
                max_rel_diff_epoch1_train_mae=max_rel_diff(
                    [r["curves"]["train/mae"][0] for r in cpu["per_replica"]],
                    [r["curves"]["train/mae"][0] for r in auto["per_replica"]],
                ),
                ok=auto["on_gpu"] and not cpu["on_gpu"] and rel <= tolerance,
            )
        rows.append(row)
    return rows


def max_rel_diff(cpu: list[float], gpu: list[float]) -> float:
    return max(abs(g - c) / c for c, g in zip(cpu, gpu, strict=True))


def speed(gpu: bool) -> list[dict[str, Any]]:
    devices = ["cpu", "auto"] if gpu else ["cpu"]
    rows = []
    for device in devices:
        run(device, "trainer.max_epochs=1")  # warm-up: CUDA context, cuBLAS handles, imports
        for replicas in (1, 100):
            m = run(device, f"model.replicas={replicas}", f"trainer.max_epochs={SPEED_EPOCHS}")
            us = m["fit_seconds"] / m["steps"] * 1e6
            rows.append(
                {
                    "device": "cuda" if m["on_gpu"] else "cpu",
                    "replicas": replicas,
                    "steps": m["steps"],
                    "fit_seconds": m["fit_seconds"],
                    "us_per_step": us,
                    "us_per_model_step": us / replicas,
                    "test_mae_mean": m["test/mae"],
                }
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--tolerance", type=float, default=0.03, help="relative test-MAE tolerance")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    gpu = torch.cuda.is_available()
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "cpu_threads_per_job": 1,
    }
    print(f"torch {env['torch']} (CUDA {env['cuda']}), lightning {env['lightning']}")
    if not gpu:
        print("CUDA is not available here: running the CPU half only; no GPU figures.")
    else:
        print(f"GPU: {env['gpu']}")

    start = time.perf_counter()
    agree = agreement(args.tolerance, gpu)
    timing = speed(gpu)
    result = {
        "env": env,
        "tolerance": args.tolerance,
        "agreement": agree,
        "speed": timing,
        "gpu_checked": gpu,
        "all_ok": all(r.get("ok", True) for r in agree),
        "seconds": round(time.perf_counter() - start, 1),
    }

    print("\nTest MAE, seed 0, 7 epochs, batch size 1 (per replica):")
    for r in agree:
        cpu = ", ".join(f"{v:.3f}" for v in r["cpu_test_mae"])
        line = f"  {r['job']:<9} cpu [{cpu}]"
        if gpu:
            g = ", ".join(f"{v:.3f}" for v in r["gpu_test_mae"])
            verdict = (
                "ok"
                if r["ok"]
                else "MISMATCH"
                if r["auto_picked_gpu"]
                else "FAIL: accelerator=auto did not use the GPU"
            )
            line += (
                f"  cuda [{g}]  max rel diff {r['max_rel_diff']:.2%}"
                f" (train MAE after epoch 1: {r['max_rel_diff_epoch1_train_mae']:.2%})  {verdict}"
            )
        print(line)
    print(f"\nSpeed, batch size 1, {SPEED_EPOCHS} epochs:")
    print(f"  {'device':<6} {'replicas':>8} {'us/step':>10} {'us/model-step':>14} {'test MAE':>9}")
    for r in timing:
        print(
            f"  {r['device']:<6} {r['replicas']:>8} {r['us_per_step']:>10.0f} "
            f"{r['us_per_model_step']:>14.1f} {r['test_mae_mean']:>9.3f}"
        )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
