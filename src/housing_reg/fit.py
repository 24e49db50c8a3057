"""One fit: the jobs that train together built into one model, one Trainer and one recorder,
trained and tested; and the threads it trains on."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from housing_reg import cores, kernels, startup
from housing_reg.checkpoints import JobCheckpoints
from housing_reg.data import FitData
from housing_reg.model import Heads, Regressor
from housing_reg.prepare import Prepared
from housing_reg.record import FitRecorder, JobRecorder
from housing_reg.resume import resolved
from housing_reg.settings import create

log = logging.getLogger(__name__)


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
    """Train and test jobs as the replicas of one fit. Ctrl-C raises startup.NotStarted until the
    fit's first record (its jobs' TensorBoard hyperparameters), startup.Interrupted after it."""
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
                raise startup.NotStarted() from None
            done = len(recorders[0].history["train/mae"])
            raise startup.Interrupted(
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
