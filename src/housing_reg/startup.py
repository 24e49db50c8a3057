"""Ctrl-C while `python -m housing_reg.train` starts: one line, exit status 130, and no job
directory left holding only what its start wrote.

For its first seconds the command imports torch and Lightning, composes its config and
builds the job. A KeyboardInterrupt raised anywhere in there can land in a library's bare
`except:` (seen: a half-imported numpy.linalg, then a RecursionError; or the Ctrl-C lost and
the job trained on). So while a job starts, SIGINT raises nothing: its handler removes what the
start wrote (`discard`), prints one line and exits. Once training starts (`release`, called by
train.fit just before Lightning's fit), Ctrl-C is a KeyboardInterrupt again, which Lightning
turns into a graceful stop (Interrupted, below). This module imports nothing heavy: the package's
__init__ installs the guard before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

NOT_STARTED = "interrupted before training started; nothing recorded"
EXIT_STATUS = 130  # a Ctrl-C's: 128 + SIGINT, as a shell reports it
# What a job's start writes into its directory before anything of the job's own (Hydra's
# .hydra/ and the job's log): a directory holding nothing else records nothing.
STARTUP_FILES = frozenset({".hydra", "train.log"})


class _State:
    enabled = False  # only under `python -m housing_reg.train` (guard_command)
    starting: list[Path] = []  # the job directories whose start is under way
    made: list[Path] = []  # output directories this run created (argv.check_output_dirs)
    preexisting: set[Path] = set()  # ... and those named that existed before it
    # The line to print, given what the run was doing; cli.start sets it (a sweep's hint).
    describe: list[Callable[[], str]] = [lambda: NOT_STARTED]


def guard_command() -> None:
    """From the package's import on, when the command is `python -m housing_reg.train`: an
    importer of this package keeps Python's own Ctrl-C."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["housing_reg.train"]:
        _State.enabled = True
        guard()


def guard() -> None:
    """A job starts: Ctrl-C stops the process at once (see the module docstring). Left alone
    where SIGINT is ignored (a background job of a non-interactive shell) or handled by
    someone else."""
    if _State.enabled and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop)


def release() -> None:
    """Training starts: Ctrl-C raises KeyboardInterrupt again."""
    if signal.getsignal(signal.SIGINT) is _stop:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def starting(dirs: Iterable[str | Path]) -> None:
    """These job directories are being started: an early Ctrl-C discards them."""
    _State.starting = [Path(str(d)) for d in dirs]


def named_on_command_line(path: Path) -> None:
    """An output directory named on the command line, before it is created."""
    path = path.absolute()
    if path.is_dir():
        _State.preexisting.add(path)
    else:
        _State.made.append(path)


def discard_all() -> None:
    """Discard every directory this run was starting, and the current Hydra job's."""
    dirs = [*_State.starting, *_State.made]
    if "hydra.core.hydra_config" in sys.modules:  # Hydra had got as far as composing
        with contextlib.suppress(Exception):  # ... but maybe not as far as a job
            from hydra.core.hydra_config import HydraConfig

            dirs.append(Path(HydraConfig.get().runtime.output_dir))
    for path in dirs:
        discard(path)


def discard(job: Path) -> None:
    """Remove what a job's start wrote (STARTUP_FILES) when the directory holds nothing else,
    then the directory itself unless it existed before this run. A directory with anything of
    a job's own (a checkpoint, metrics.json, failure.json) is left as it is."""
    try:
        entries = {p.name for p in job.iterdir()}
    except OSError:
        return  # never made, or already gone
    if not entries <= STARTUP_FILES:
        return
    import shutil  # here: this module is imported first thing, and must be quick

    for name in entries:
        path = job / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if job.absolute() not in _State.preexisting:
        with contextlib.suppress(OSError):
            job.rmdir()


def set_describe(describe: Callable[[], str]) -> None:
    """What the handler says, given what the run was doing (cli.start: a sweep's hint)."""
    _State.describe[:] = [describe]


def _stop(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    try:
        discard_all()
        line = _State.describe[0]()
    except Exception:  # whatever went wrong, the process still stops with its one line
        line = NOT_STARTED
    print(f"error: {line}", file=sys.stderr)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_STATUS)  # at once: nothing started is worth finishing, or saving


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped training; checkpoints/last.ckpt holds the last whole epoch.
    outcomes: of a fit of several jobs, what each job had come to (None: unfinished)."""

    outcomes: list[Any] | None = None


class NotStarted(Interrupted):
    """Ctrl-C before any training started (reading data, building the model, Lightning's
    set-up): nothing of the job was recorded, and nothing of its start is kept."""

    def __init__(self) -> None:
        super().__init__(NOT_STARTED)
