"""A sweep as a whole: its settings checked before it starts, its directory locked while its
jobs run, its jobs' directories checked before any trains, and the table it ends with.

`Sweep` is a Hydra callback (conf/config.yaml); the fused sweeper calls `check_job_dirs` with
every job's directory once it has composed them, fused or not.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from housing_reg.jobdir import find_jobs, is_bookkeeping, read_state, short_names
from housing_reg.settings import ConfigError, check_fuse

LOCK = ".lock"


class Sweep(Callback):
    """Checks the `fuse` settings, holds a lock on the sweep directory while jobs run, then
    prints what varied, each job's MAEs, the failures and the next command; exits 1 if any
    job failed."""

    active: Path | None = None  # the sweep directory while its jobs run
    held: FileLock | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_fuse(config.fuse)
        except ConfigError as e:
            release(Path(config.hydra.sweep.dir))  # argv.check_output_dirs may have made it
            sys.exit(f"error: {e}")
        lock(Path(config.hydra.sweep.dir))
        Sweep.active = Path(config.hydra.sweep.dir)
        # Ctrl-C stops a job at once only while that job starts (runs.run_jobs): a
        # parallel sweep's own process must stop its workers, which a KeyboardInterrupt does.
        from housing_reg import startup

        startup.release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir, Sweep.active = Path(config.hydra.sweep.dir), None
        unlock(sweep_dir)
        text, failed, retry = summarize(sweep_dir)
        print(text)
        if failed:
            print(f"{len(failed)} job(s) failed: " + "; ".join(failed), file=sys.stderr)
            if retry:
                print(f"to finish them: {rerun_command(config)}", file=sys.stderr)
            else:  # refused settings, a diverged fit: a retry would fail the same way
                print("no retry would change that: fix what the lines above name", file=sys.stderr)
            sys.exit(1)


def check_job_dirs(dirs: Sequence[str | Path], resume: Sequence[bool]) -> None:
    """Before anything trains: no two jobs of a sweep resolve to one directory (one's results
    would replace the other's, their curves mixed in one TensorBoard run), and no job would
    train again into a finished job's directory without resume=true."""
    paths = [Path(str(d)).absolute() for d in dirs]
    shared = [p for p, n in Counter(paths).items() if n > 1]
    if shared:
        raise ConfigError(
            f"{len(shared)} director{'y is' if len(shared) == 1 else 'ies are'} shared by "
            f"several jobs of this sweep ({shared[0]}); give each job its own, e.g. with "
            "${hydra.job.num} in hydra.sweep.subdir (the default)"
        )
    finished = [p for p, r in zip(paths, resume, strict=True) if not r and finished_job(p)]
    if finished:
        names = ", ".join(p.name for p in finished[:3]) + (", ..." if len(finished) > 3 else "")
        raise ConfigError(
            f"{len(finished)} job(s) of this sweep already finished in {finished[0].parent} "
            f"({names}); rerun with resume=true to keep them and train only what is left, or "
            "choose another hydra.sweep.dir"
        )


def finished_job(path: Path) -> bool:
    return (path / "metrics.json").is_file() and read_state(path).status == "ok"


def lock(sweep_dir: Path) -> None:
    """sweep_dir/.lock, held (an OS file lock, freed when the process ends however it ends)
    while this sweep writes there: a second live sweep into it stops with one line."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        held = FileLock(sweep_dir / LOCK, timeout=0)
        held.acquire()
    except Timeout:
        sys.exit(
            f"error: another sweep is writing to {sweep_dir}; wait for it to finish or "
            "choose another hydra.sweep.dir"
        )
    except OSError as e:  # a read-only directory: no lock, no sweep
        sys.exit(
            f"error: cannot lock {sweep_dir} ({e.strerror or type(e).__name__}): a sweep writes "
            "its jobs there; choose a writable hydra.sweep.dir"
        )
    Sweep.held = held


def unlock(sweep_dir: Path) -> None:
    held, Sweep.held = Sweep.held, None
    if held is not None and held.is_locked:
        with contextlib.suppress(OSError):
            (sweep_dir / LOCK).unlink()
        held.release()


def release(sweep_dir: Path) -> None:
    """Unlock a sweep that stops before its first job, and remove what it wrote if that is
    all its directory holds (Hydra's multirun.yaml): a refused sweep leaves nothing behind."""
    unlock(sweep_dir)
    with contextlib.suppress(OSError):
        if {p.name for p in sweep_dir.iterdir()} == {"multirun.yaml"}:
            (sweep_dir / "multirun.yaml").unlink()
        sweep_dir.rmdir()  # fails where it is not empty (an earlier sweep's jobs)


def rerun_command(config: DictConfig) -> str:
    # The launcher and its settings too (hydra/launcher=slurm ...): the jobs run where they ran.
    launcher = [
        a
        for a in config.hydra.overrides.hydra
        if not a.startswith(("hydra.sweep.dir=", "hydra.mode="))  # -m: hydra.mode=MULTIRUN
    ]
    task = [a for a in config.hydra.overrides.task if not a.startswith("resume=")]
    return " ".join(
        ["python -m housing_reg.train -m"]
        + [shlex.quote(a) for a in [*launcher, *task, "resume=true"]]
        + [f"hydra.sweep.dir={shlex.quote(str(config.hydra.sweep.dir))}"]
    )


def resume_args(sweep_dir: Path | str) -> str:
    return f"resume=true hydra.sweep.dir={shlex.quote(str(sweep_dir))}"


def summarize(sweep_dir: Path) -> tuple[str, list[str], bool]:
    """The end-of-sweep table: one column per override that varies across jobs (by its short
    name), then train and test MAE; one line per job that did not finish; and whether any of
    those might finish if tried again."""
    rows, failed, every, retry = [], [], [], False
    for path in find_jobs(sweep_dir):
        job = read_state(path)
        every.append(task_overrides(path))
        if job.status == "ok":
            rows.append((every[-1], job.metrics))
        else:
            failed.append(f"{path.name}: {job.status}: {job.reason}")
            retry |= job.retry
    every = [o for o in every if o]  # a job killed before Hydra saved its overrides says nothing
    keys = list(dict.fromkeys(k for o in every for k in o))
    varying = [k for k in keys if len({o.get(k) for o in every}) > 1] or keys[:1]
    names = short_names(varying)
    header = [*(names[k] for k in varying), "train MAE", "test MAE"]
    cells = [
        [o.get(k, "") for k in varying] + [f"{m['train/mae']:.3f}", f"{m['test/mae']:.3f}"]
        for o, m in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *cells]
    ]
    shown = shlex.quote(str(sweep_dir))
    lines += [
        "",
        f"sweep directory: {sweep_dir}",
        f"next: python -m housing_reg.report {shown}    (or: tensorboard --logdir {shown})",
    ]
    return "\n".join(lines), failed, retry


def task_overrides(job: Path) -> dict[str, str]:
    """The job's own command-line overrides (Hydra's .hydra/overrides.yaml), key -> value."""
    path = job / ".hydra" / "overrides.yaml"
    items = OmegaConf.load(path) if path.exists() else []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        if not is_bookkeeping(key.lstrip("+~")):
            out[key.lstrip("+~")] = value
    return out
