"""Train and test one job: `python -m housing_reg.train [overrides]`, or `-m` for a sweep.

`train(cfg)` is a plain function (tests call it with a composed config): build, fit, test.
The job's files are written by record.JobRecorder; the command line's policy (exit codes,
one-line errors, the sweep summary) lives in cli.py, and `main` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from housing_reg import cli, cores, fuse, group, kernels, memory, startup
from housing_reg.data import FitData, RegressionData
from housing_reg.jobdir import CHECKPOINT, load_checkpoint, read_state
from housing_reg.model import (
    Heads,
    Regressor,
    denormals_flushed,
    intra_op_threads,
    replica_seeds,
)
from housing_reg.record import FitRecorder, JobCheckpoints, JobRecorder, training_settings
from housing_reg.settings import ConfigError, check_config, create

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A job checked and ready to train: its settings, its data and head, where it resumes."""

    index: int
    cfg: DictConfig
    data: RegressionData
    head: torch.nn.Module
    resume_from: Path | None
    progress: tuple[int, int]  # (epoch, step) it resumes from


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training rows, test on the held-out rows; returns metrics.json's contents."""
    (outcome,) = train_jobs([cfg])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def train_jobs(cfgs: Sequence[DictConfig]) -> list[dict[str, Any] | BaseException]:
    """Each job's metrics.json contents, or the error that failed it. Jobs that can share a
    fit (fuse.py) train as its replicas, each with the numbers of its lone run; a job's bad
    settings, or a fit too large for memory (memory.py), fail it before any training starts.
    Ctrl-C raises cli.Interrupted (cli.NotStarted before any training), which carries the
    outcomes so far."""
    outcomes: list[dict[str, Any] | BaseException | None] = [None] * len(cfgs)
    ready = []
    try:
        for i, cfg in enumerate(cfgs):
            try:
                finished = already_finished(cfg)
                if finished is not None:
                    log.info("resume=true: %s already finished; not rerun", cfg.output_dir)
                    outcomes[i] = finished
                else:
                    ready.append(prepare(i, cfg))
            except Exception as e:  # reported now, before any job of the group trains
                refused(cfgs, cfg, e)
                outcomes[i] = e
        cap = fuse.cap(cfgs[0].fuse.max_replicas) if cfgs else 1
        fits = []
        for jobs in fuse.groups(ready, fit_key, lambda j: j.cfg.model.replicas, cap):
            try:  # each job alone fits (prepare): does the fit of them all?
                if len(jobs) > 1:
                    memory.check([j.cfg for j in jobs], [shapes(j.data) for j in jobs])
                fits.append(jobs)
            except ConfigError as e:
                for job in jobs:
                    refused(cfgs, job.cfg, e)
                    outcomes[job.index] = e
    except KeyboardInterrupt:
        stop = cli.NotStarted()
        stop.outcomes = outcomes  # the jobs refused so far are settled
        raise stop from None
    for n, jobs in enumerate(fits, 1):
        try:
            try:
                # With-blocks, not decorators: Ray pickles this module's code by value.
                with denormals_flushed(), intra_op_threads() as set_threads:
                    threads = cores.Watch(fit_threads(jobs), set_threads, threads_changed)
                    if len(cfgs) > 1:
                        models = sum(j.cfg.model.replicas for j in jobs)
                        log.info(
                            "fit %d of %d: %d jobs, %d models, %d thread(s)",
                            *(n, len(fits), len(jobs), models, threads.current),
                        )
                    fitted = fit(jobs, threads)
                for job, outcome in zip(jobs, fitted, strict=True):
                    outcomes[job.index] = outcome
            except KeyboardInterrupt:  # between fits
                raise cli.NotStarted() from None
        except cli.Interrupted as e:
            if isinstance(e, cli.NotStarted) and n > 1:  # earlier fits trained: not nothing
                e = cli.Interrupted(f"interrupted before fit {n} of {len(fits)} started")
            e.outcomes = outcomes
            raise e from None
        except Exception as e:  # a bug: every job of this fit fails, the other fits go on
            for job in jobs:
                outcomes[job.index] = e
    return outcomes


def refused(cfgs: Sequence[DictConfig], cfg: DictConfig, e: Exception) -> None:
    """A job of a group that will not train is logged as it is found, and only then
    (`reported`: cli.run_jobs says no more of it); a lone job's error is cli.py's one line."""
    if len(cfgs) > 1:
        log.error("job %s will not train: %s", Path(str(cfg.output_dir)).name, e)
        e.reported = True


def prepare(index: int, cfg: DictConfig) -> Prepared:
    """A job's settings checked, its data read, its memory estimated; nothing built yet."""
    check_config(cfg)
    check_not_replacing(cfg)
    data: RegressionData = create(cfg.data, seeds=replica_seeds(cfg.seed, cfg.model.replicas))
    data.setup("fit")  # now, not in trainer.fit: every job's data is checked before any trains
    memory.check([cfg], [shapes(data)])
    head = create(cfg.head.activation)
    resume_from, progress = checkpoint_to_resume(cfg, data.file)
    return Prepared(index, cfg, data, head, resume_from, progress)


def shapes(data: RegressionData) -> dict[str, tuple[int, ...]]:
    """Each split's x shape, for memory.check."""
    return {name: tuple(x.shape) for name, (x, _) in data.splits.items()}


def fit_key(job: Prepared) -> tuple:
    """Jobs share a fit when fuse.py allows it, their splits have the same sizes (folds of
    other sizes do not), they resume from the same epoch, their head learns nothing, no
    schedule follows their own metric (plateau), and this torch's stacked matmul gives a
    replica the same bits wherever it sits in the stack (kernels.stacks_exact)."""
    sizes = tuple(x.shape for x, _ in job.data.splits.values())
    learns = any(True for _ in job.head.parameters())
    plateau = job.cfg.lr_scheduler.name == "plateau"  # follows this job's own val/mae
    alone = job.index if learns or plateau or not stackable(job) else None
    return fuse.fit_key(resolved(job.cfg)), sizes, job.progress, alone


def stackable(job: Prepared) -> bool:
    """Whether every call the job's layers make (a training step's rows, each evaluation
    chunk's) gives a replica its bits wherever it sits in a stack."""
    data = job.data
    rows = {data.batch_size, *(min(len(x), data.eval_batch_size) for x, _ in data.splits.values())}
    sizes = [data.num_features, *job.cfg.model.hidden, 1]
    return kernels.stacks_exact(sorted(r for r in rows if r), sizes)


def fit_threads(jobs: list[Prepared]) -> int:
    """The threads a fit wants: a lone job its `threads`; a fit of several jobs theirs
    together, within the threads this process has (torch's default: the cores it may use; a
    parallel launcher's worker: its share). A 64-wide layer of one model gains nothing from a
    second thread; the stacked layers of a fused fit do (docs/speed.md). Only where no job's
    head sees more than kernels.GRAIN elements at once and the probe confirms it on this
    torch: then every op a job's numbers depend on rounds alike on any number of threads (the
    study's 1,120 MAEs: 0 differ), so cores.Watch may
    take threads away and give them back while it trains, whenever other programs want the
    cores."""
    own = jobs[0].cfg.threads  # the same for every job of a fit (fit_key)
    pooled = min(own * len(jobs), torch.get_num_threads())
    if len(jobs) == 1 or pooled <= own or max(map(head_elements, jobs)) > kernels.GRAIN:
        return own
    return pooled if kernels.threads_keep_bits(pooled) else own


def head_elements(job: Prepared) -> int:
    """The most elements the job's head takes in one call: its replicas times a mini-batch's
    rows, or an evaluation chunk's."""
    data, rows = job.data, max(len(x) for x, _ in job.data.splits.values())
    return job.cfg.model.replicas * max(data.batch_size, min(rows, data.eval_batch_size))


def threads_changed(n: int, taken: float) -> None:
    log.info("training on %d thread(s): other programs use %.1f of this fit's cores", n, taken)


class Threads(L.Callback):
    """Looks at the cores again before each block of steps (cores.Watch: every 0.25 s)."""

    def __init__(self, watch: cores.Watch):
        self.watch = watch

    def on_train_batch_start(self, *args: Any) -> None:
        self.watch.check()


def fit(jobs: list[Prepared], threads: cores.Watch) -> list[dict[str, Any] | BaseException]:
    """Train and test jobs as the replicas of one fit. Ctrl-C raises cli.NotStarted until the
    fit's first record (its jobs' TensorBoard hyperparameters), cli.Interrupted after it."""
    first = jobs[0].cfg
    L.seed_everything(first.seed, verbose=False)
    data = FitData([j.data for j in jobs])
    model = build_model(jobs, data)
    recorders, start = [], 0
    for job in jobs:
        n = job.cfg.model.replicas
        hparams = model.hparams | {"replicas": n, "seed": job.cfg.seed}
        hparams["head_name"] = job.cfg.head.name
        logger = create(job.cfg.logger) if job.cfg.get("logger") is not None else None
        recorders.append(
            JobRecorder(resolved(job.cfg), job.data, logger, slice(start, start + n), hparams)
        )
        recorders[-1].checkpoint = job.resume_from  # the model as it stands before training
        start += n
    resume_from = [j.resume_from for j in jobs]
    trainer_cfg, checkpoints = trainer_settings(first)
    recorder = FitRecorder(recorders, first.checkpoint_every if checkpoints else 0)
    trainer: L.Trainer = create(
        trainer_cfg,
        logger=False,  # each job logs to its own TensorBoard run (JobRecorder)
        callbacks=[
            recorder,
            Threads(threads),
            *(create(c) for c in first.callbacks.values() if c is not None),
        ],
        plugins=[
            *create(first.trainer.get("plugins") or []),
            JobCheckpoints(recorders, resume_from),
        ],
        limit_val_batches=1.0 if data.has_validation else 0,  # 0: no validation loop at all
    )
    startup.release()  # from here a Ctrl-C is Lightning's to handle: a graceful stop
    try:
        try:
            trainer.fit(
                model,
                datamodule=data,
                ckpt_path=resume_from[0] if resume_from[0] else None,
                weights_only=True,
            )
            if any(r.error is None for r in recorders):
                trainer.test(model, datamodule=data, verbose=False)
        except (SystemExit, KeyboardInterrupt) as e:  # SystemExit: Lightning's graceful stop
            if isinstance(e, SystemExit) and not trainer.interrupted:  # on Ctrl-C / SIGTERM
                raise
            if not recorder.started:
                raise cli.NotStarted() from None
            done = len(recorders[0].history["train/mae"])
            raise cli.Interrupted(
                f"interrupted with {done} of {first.trainer.max_epochs} epochs done"
            ) from None
    finally:
        for r in recorders if recorder.started else []:  # else nothing to close: finalizing
            r.close()  # an unused logger would write an empty run into the job directory
    outcomes = {j.index: r.error or r.metrics for j, r in zip(jobs, recorders, strict=True)}
    return [outcomes[j.index] for j in sorted(jobs, key=lambda j: j.index)]


# Trainer arguments this package carries out itself (settings.check_trainer refuses the ones
# the manual, blocked loop cannot honour): clipping per replica in the model, and
# enable_checkpointing as checkpoint_every=0 (the job recorder is Lightning's Checkpoint).
OWN_TRAINER_KEYS = ("gradient_clip_val", "gradient_clip_algorithm", "enable_checkpointing")


def trainer_settings(cfg: DictConfig) -> tuple[DictConfig, bool]:
    """cfg.trainer without OWN_TRAINER_KEYS, and whether to write checkpoints."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    own = {k: node.pop(k) for k in OWN_TRAINER_KEYS if k in node}
    return OmegaConf.create(node), own.get("enable_checkpointing", True) is not False


def build_model(jobs: list[Prepared], data: FitData) -> Regressor:
    """One Regressor for every replica of the jobs: each job's head on its own replicas, and
    each job's scalers (per replica when the fit holds several jobs)."""
    first = jobs[0]
    inputs = first.data.model_inputs()
    if len(jobs) > 1:
        for name in ("x_shift", "x_scale", "y_shift", "y_scale"):
            inputs[name] = torch.cat(
                [
                    torch.as_tensor(j.data.model_inputs()[name])
                    .reshape(1, 1, -1)
                    .expand(j.cfg.model.replicas, 1, -1)
                    for j in jobs
                ]
            )
    return create(
        model_settings(first.cfg),
        _convert_="all",  # plain lists in the checkpoint's hyperparameters
        head=merge_heads(jobs),
        optimizer=create(first.cfg.optim),
        seed=first.cfg.seed,
        head_name=first.cfg.head.name,
        replicas=data.models,
        metric_rows=data.eval_batch_size,
        seeds=data.seeds,
        gradient_clip_val=first.cfg.trainer.get("gradient_clip_val"),
        gradient_clip_algorithm=first.cfg.trainer.get("gradient_clip_algorithm", "norm"),
        lr_scheduler=create(first.cfg.lr_scheduler.scheduler),
        **inputs,
    )


def merge_heads(jobs: list[Prepared]) -> torch.nn.Module:
    """The jobs' heads in replica order: an activation's vectorized kernel and its scalar tail
    round differently (sigmoid, softplus), so each job's elements must take the kernel path
    of its lone run's call; model.Heads shares a call only where they do."""
    if len(jobs) == 1:
        return jobs[0].head
    return Heads([(job.cfg.model.replicas, job.head) for job in jobs])


def model_settings(cfg: DictConfig) -> DictConfig:
    """cfg.model, resolved, without `width`: hparams_search=optuna searches model.width and
    sets model.hidden from it, and the model takes only hidden."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node.pop("width", None)
    return OmegaConf.create(node)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """What ran, with every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True)


def already_finished(cfg: DictConfig) -> dict[str, Any] | None:
    """resume=true on a job that finished with these very settings: its metrics, untouched."""
    if not cfg.resume or cfg.ckpt_path:
        return None
    job = read_state(Path(cfg.output_dir))
    if job.status != "ok":
        return None
    same = training_settings(job.metrics["config"]) == training_settings(resolved(cfg))
    done = job.metrics["epochs"] == cfg.trainer.max_epochs
    return job.metrics if same and done else None


def check_not_replacing(cfg: DictConfig) -> None:
    """A run into a finished job's directory (without resume=true) would replace its results
    and put a second run's curves beside the first in TensorBoard: refused, in one line."""
    if cfg.resume or cfg.ckpt_path:
        return
    job = read_state(Path(cfg.output_dir))
    if job.status != "ok":
        return
    differ = differences(training_settings(job.metrics["config"]), training_settings(resolved(cfg)))
    if differ:
        raise ConfigError(
            f"{cfg.output_dir} holds a finished job trained with other settings "
            f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}); train into "
            "another directory (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep), or "
            "resume=true with the settings it was trained with"
        )
    raise ConfigError(
        f"{cfg.output_dir} holds a finished job with these settings; resume=true keeps it (and "
        "trains only if trainer.max_epochs grew), or train into another directory "
        "(hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)"
    )


def checkpoint_to_resume(
    cfg: DictConfig, data_file: dict[str, str]
) -> tuple[Path | None, tuple[int, int]]:
    """ckpt_path, else (resume=true) the job's own last checkpoint, refused unless it was
    trained with these settings (all but trainer.max_epochs and cosmetic ones); with the
    (epoch, step) it holds."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
    elif cfg.resume:
        path = Path(cfg.output_dir) / CHECKPOINT
        if not path.is_file():
            log.warning("resume=true: no checkpoint at %s yet, starting from scratch", path)
            return None, (0, 0)
    else:
        return None, (0, 0)
    ckpt = load_checkpoint(path)
    saved = ckpt.get("callbacks", {}).get(JobRecorder.__qualname__, {})
    if "config" not in saved:
        raise ConfigError(f"{path} records no settings to check against; train afresh")
    differ = differences(saved["config"], training_settings(resolved(cfg)))
    if differ:
        raise ConfigError(
            f"{path} was trained with other settings ({'; '.join(differ)}); resume with the "
            "settings it was trained with (only trainer.max_epochs may change), or train afresh "
            "in another directory"
        )
    trained_on = saved.get("data_file")
    if trained_on and trained_on["sha256"] != data_file["sha256"]:
        raise ConfigError(
            f"{path} was trained on {trained_on['path']}, and {data_file['path']} now holds "
            f"other contents (SHA-256 {trained_on['sha256'][:12]}... then, "
            f"{data_file['sha256'][:12]}... now): its scalers and split no longer fit the "
            "data; train afresh in another directory"
        )
    done = len(saved.get("history", {}).get("train/mae", []))  # whole epochs it holds
    if done > cfg.trainer.max_epochs:
        raise ConfigError(
            f"{path} holds {done} finished epochs, more than trainer.max_epochs="
            f"{cfg.trainer.max_epochs}; resume with trainer.max_epochs>={done}, or train "
            "afresh in another directory"
        )
    return path, (ckpt.get("epoch", 0), ckpt.get("global_step", 0))


def differences(there: dict[str, Any], here: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old there, new here` for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} there, {b} here")
    return out


@hydra.main(version_base="1.3", config_path="pkg://housing_reg.conf", config_name="config")
def main(cfg: DictConfig) -> float | dict[int, float | None] | None:
    if cfg.fuse.group:  # a fused sweep's task: several jobs (group.py)
        return group.run_group(cfg.fuse.group, lambda cfgs: cli.run_jobs(train_jobs, cfgs))
    return cli.run_job(train, cfg)


if __name__ == "__main__":
    cli.start(main)
