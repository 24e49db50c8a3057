"""What a fit will need in memory, estimated before anything is built, and refused in one line
when that is more than the machine (or its cgroup) has: otherwise a too-large job fails deep
inside torch ("can't allocate ... bytes") or is killed by the OOM killer without a word.

The estimate follows how model.py and data.py hold a fit of R models (all the replicas of all
its jobs), in float32:
  parameters        every layer's weights and biases, stacked along the replica axis
  gradients         one per parameter (zeroed in place, never freed)
  optimizer state   per parameter, as many buffers as the optimizer keeps (OPTIMIZER_BUFFERS)
  training          each replica's order of the epoch's rows, a block of data.steps_per_block
                    mini-batches gathered (and the next, fetched ahead), the predictions that
                    wait for the train metrics (data.eval_batch_size rows at a time, else the
                    epoch's) with the metrics' update, and the peak of one optimizer step: its
                    activations, their gradients and the largest layer's gradient and
                    optimizer temporaries; R=1 may run beside a detached twin (model.py,
                    kernels.lone_needs_twin): counted twice, an upper bound
  evaluation        a chunk of data.eval_batch_size rows (else a whole split) through the
                    network without gradients, its outputs and metric updates, and the test
                    predictions kept for predictions.csv (or, in validation, the training
                    predictions still waiting)
  checkpoint        a checkpoint (parameters and optimizer state) serialized in memory
                    (checkpoints.to_bytes, with io.BytesIO's slack), or loaded to resume
  initialization    a layer's random draws for one replica (model.StackedMLP), twice
  data              a fit of several jobs stacks every split once per replica (data.FitData)
Parameters, gradients, optimizer state and stacked data live throughout; the others take
turns, so the largest of them counts. The interpreter and
its libraries are already loaded when the estimate is made, and are not in it.

It is compared with what is available: HOUSING_REG_MEMORY_LIMIT if set, else the cgroup's
limit less what this process already holds, and never more than MemAvailable in
/proc/meminfo. Only the CPU is checked (trainer.accelerator=cpu, the default, or auto without
a GPU): on a GPU the model lives in the GPU's memory, which this does not read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig

from housing_reg.data import STEPS_PER_BLOCK
from housing_reg.settings import ConfigError

F32 = 4  # bytes of a float32
ENV = "HOUSING_REG_MEMORY_LIMIT"  # a size (8G, 512M, bytes) or "off"; see available()
CGROUP_V2 = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
MEMINFO = Path("/proc/meminfo")
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def optimizer_buffers(optim: Mapping) -> int:
    """Buffers of a parameter's size the optimizer keeps for each parameter (conf/optim/)."""
    name = str(optim.get("_target_", "")).rsplit(".", 1)[-1]
    momentum = bool(optim.get("momentum", 0))
    if name == "SGD":
        return int(momentum)  # momentum_buffer
    if name == "RMSprop":  # square_avg, + momentum_buffer, + grad_avg when centered
        return 1 + int(momentum) + int(bool(optim.get("centered", False)))
    if name in ("Adam", "AdamW"):  # exp_avg, exp_avg_sq, + max_exp_avg_sq with amsgrad
        return 2 + int(bool(optim.get("amsgrad", False)))
    if name == "Adagrad":
        return 1
    return 2  # Adamax, NAdam, RAdam, Adadelta, Rprop, ...: two buffers, as most keep


@dataclass(frozen=True)
class Fit:
    """What the estimate needs to know of a fit of one or more jobs."""

    hidden: Sequence[int]
    features: int
    replicas: int  # models in the fit, every job's together
    jobs: int  # jobs in the fit: more than one stacks the rows per replica
    rows: Mapping[str, int]  # rows per split: train, val, test
    batch_size: int
    steps_per_block: int  # mini-batches gathered at a time
    eval_batch_size: int | None  # rows per evaluation chunk; None: a whole split
    buffers: int  # optimizer_buffers
    checkpoints: bool

    def parts(self) -> dict[str, int]:
        """Bytes per part (the module docstring says what each holds)."""
        r = self.replicas
        twin = 2 if r == 1 else r  # a lone model may run with its detached twin
        sizes = [self.features, *self.hidden, 1]
        layers = list(zip(sizes[:-1], sizes[1:], strict=True))
        per_model = sum(i * o + o for i, o in layers)
        largest = max(i * o for i, o in layers)
        params = r * per_model * F32
        n_train = self.rows.get("train", 0)
        b = min(self.batch_size, n_train) or 1
        # A step: each layer's output and its relu, saved for backward, their gradients, and
        # the largest layer's weight gradient and optimizer temporary before they are applied.
        step = twin * b * (2 * sum(sizes[1:]) + 2 * max(sizes)) * F32
        step += (twin + r) * largest * F32  # a twin's gradient is the twin's size
        if r == 1:
            step += 2 * per_model * F32  # the twin's stacked weights, saved for backward
        index = 4 if n_train < 2**31 else 8  # data.EpochBatches' int32 orders
        order = 2 * r * n_train * index  # each replica's permutation, then stacked
        block = min(b * self.steps_per_block, n_train)
        blocks = 2 * r * block * (self.features + 1) * F32  # gathered, and the next fetched
        waiting = n_train if self.eval_batch_size is None else self.eval_batch_size + block
        waiting = min(waiting, n_train)
        kept = 2 * r * waiting * F32  # predictions, and the blocks of targets they hold on to
        update = 6 * r * waiting * F32  # concatenated, in target units, differences
        training = order + blocks + kept + max(step, update)
        evals = [n for name, n in self.rows.items() if name != "train" and n]
        if evals:
            chunk = max(min(self.eval_batch_size or n, n) for n in evals)
            widest = max(a + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
            forward = twin * chunk * max(widest, 2 * max(sizes[1:])) * F32
            outputs = 4 * r * chunk * F32  # predictions, targets, metric temporaries
            test = 4 * r * self.rows.get("test", 0) * F32  # kept, then concatenated
            evaluation = forward + outputs + max(test, kept)
        else:
            evaluation = 0
        data = 0
        if self.jobs > 1:
            data = r * sum(self.rows.values()) * (self.features + 1) * F32
        return {
            "parameters": params,
            "gradients": params,
            "optimizer state": self.buffers * params,
            "data": data,
            "training": training,
            "evaluation": evaluation,
            "checkpoint": (1 + self.buffers) * params * 9 // 8 if self.checkpoints else 0,
            "initialization": 2 * largest * F32,
        }

    def needed(self) -> int:
        """The peak: what lives throughout, plus the largest of what takes turns."""
        p = self.parts()
        turns = max(p["training"], p["evaluation"], p["checkpoint"], p["initialization"])
        return p["parameters"] + p["gradients"] + p["optimizer state"] + p["data"] + turns


def fit_of(cfgs: Sequence[DictConfig], splits: Sequence[Mapping[str, tuple[int, ...]]]) -> Fit:
    """The Fit of jobs (their configs, and each job's splits' x shapes) trained together."""
    first = cfgs[0]
    rows = {name: int(shape[-2]) for name, shape in splits[0].items()}
    checkpoints = first.checkpoint_every > 0 and first.trainer.get("enable_checkpointing", True)
    return Fit(
        hidden=[int(h) for h in first.model.hidden],
        features=int(splits[0]["train"][-1]),
        replicas=sum(int(c.model.replicas) for c in cfgs),
        jobs=len(cfgs),
        rows=rows,
        batch_size=int(first.data.batch_size),
        steps_per_block=int(first.data.get("steps_per_block", STEPS_PER_BLOCK)),
        eval_batch_size=first.data.get("eval_batch_size"),
        buffers=optimizer_buffers(first.optim),
        checkpoints=bool(checkpoints),
    )


def check(cfgs: Sequence[DictConfig], splits: Sequence[Mapping[str, tuple[int, ...]]]) -> None:
    """ConfigError when the fit of these jobs needs more memory than is available."""
    first = cfgs[0]
    if not on_cpu(str(first.trainer.get("accelerator", "cpu"))):
        return  # its memory is the GPU's (the module docstring)
    limit = available()
    if limit is None:
        return
    have, where = limit
    fit = fit_of(cfgs, splits)
    need = fit.needed()
    if need <= have:
        return
    parts = ", ".join(f"{k} {size(v)}" for k, v in fit.parts().items() if v >= need / 100)
    what = (
        f"model.hidden={list(fit.hidden)} with model.replicas={fit.replicas}"
        if len(cfgs) == 1
        else f"this fit of {len(cfgs)} jobs ({fit.replicas} models of widths {list(fit.hidden)})"
    )
    fix = remedy(fit, have, "eval_batch_size" in first.data)
    raise ConfigError(
        f"{what} needs about {size(need)} of memory ({parts}), more than the {size(have)} "
        f"available ({where}); {fix}"
    )


def on_cpu(accelerator: str) -> bool:
    """Whether the fit's tensors live in the machine's memory: trainer.accelerator=cpu, or
    auto where there is no GPU."""
    if accelerator == "auto":
        import torch  # here: reading this module's estimate needs no torch

        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps and mps.is_available())
    return accelerator == "cpu"


def remedy(fit: Fit, have: int, eval_batch_size: bool) -> str:
    """What to lower: in a fit of several jobs, the most models per fit that fit; else the
    sizes, and a batch size where most of the need is its batches'."""
    if fit.jobs > 1:
        low, high = 0, fit.replicas  # the most replicas that fit: low fits, high does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if replace(fit, replicas=mid).needed() <= have else (low, mid)
        if low:
            return f"lower fuse.max_replicas to {low} or less"
    need, fixes = fit.needed(), "lower model.replicas or model.hidden"
    if need - replace(fit, batch_size=1).needed() > need / 2:
        fixes += ", or data.batch_size"
    if eval_batch_size and need - replace(fit, eval_batch_size=1).needed() > need / 2:
        fixes += ", or data.eval_batch_size"
    return fixes


def available() -> tuple[int, str] | None:
    """The bytes this job may still use and where that figure comes from; None: no check."""
    setting = os.environ.get(ENV, "").strip()
    if setting:
        if setting.lower() == "off":
            return None
        return parse_size(setting), ENV
    free = meminfo_available()
    limit = cgroup_limit()
    if limit is not None:
        held = resident()
        left = max(limit[0] - held, 0)
        if free is None or left < free:
            return left, f"{limit[1]} {size(limit[0])}, less the {size(held)} this process holds"
    if free is None:
        return None
    return free, "MemAvailable in /proc/meminfo"


def parse_size(text: str) -> int:
    """8G, 512M, 1.5T, 1024: bytes (K, M, G, T are powers of 1024; a trailing B or iB is
    allowed)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{ENV}={text}: must be a size such as 8G, 512M or 1073741824 (bytes), or off"
        )
    return int(value * UNITS[unit])


def cgroup_limit() -> tuple[int, str] | None:
    """The cgroup's memory limit (v2, else v1) and its file; None where there is none."""
    for path in (CGROUP_V2, CGROUP_V1):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None
        value = int(text)
        if value >= 2**60:  # cgroup v1's "no limit": the largest page-aligned int64
            return None
        return value, f"the cgroup limit in {path}"
    return None


def meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident() -> int:
    """This process's resident memory (its interpreter, libraries and data so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def size(n: float) -> str:
    """Bytes as people read them: 512 B, 3.2 MiB, 160 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
