"""`python -m housing_reg.train`'s front: the command line checked in one line before Hydra
reads it (argv.py), then Hydra's app; whatever stops the run outside a job (Ctrl-C between
jobs, a full disk while Hydra writes, a refused sweep) ends in one line and an exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from hydra.errors import CompactHydraException

from housing_reg import startup
from housing_reg.argv import (
    check_choices,
    check_modes,
    check_output_dirs,
    non_ascii_hint,
    quote_paths,
)
from housing_reg.runs import Job
from housing_reg.settings import ConfigError
from housing_reg.sweep import Sweep, release, resume_args, summarize, unlock

log = logging.getLogger("housing_reg")


def start(main: Callable[[], Any]) -> None:
    """`python -m housing_reg.train`: a one-line check of group choices, then Hydra's app."""
    sys.argv[1:] = quote_paths(sys.argv[1:])
    startup.set_describe(describe_ctrl_c)
    try:
        check_modes(sys.argv[1:])
        check_choices(sys.argv[1:])
        check_output_dirs(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    # Hydra prints a stack trace for anything raised outside a job (a full disk while it saves
    # a job's .hydra/ config, say); with HYDRA_FULL_ERROR it re-raises instead, and the
    # errors are reported here, in one line, with the sweep's summary so far.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    threading.excepthook = quiet_write_errors
    try:
        main()
        sys.stdout.flush()
    except KeyboardInterrupt:  # outside a job's start and training (startup.py)
        interrupted_outside_jobs()
    except BrokenPipeError:  # `--help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except CompactHydraException as e:  # a config error: Hydra's own short message
        sys.exit(f"error: {' '.join(str(e).split())}{non_ascii_hint(sys.argv[1:])}")
    except ConfigError as e:  # a sweep refused before any job started (sweep.check_job_dirs)
        if Sweep.active is not None:
            release(Sweep.active)
        sys.exit(f"error: {e}")
    except OSError as e:
        stopped(f"{type(e).__name__}: {e}")


def quiet_write_errors(args: threading.ExceptHookArgs) -> None:
    """TensorBoard writes event files from a thread; a full disk there is one line, not a
    traceback (the job's next write raises it again, and that fails the job)."""
    if isinstance(args.exc_value, OSError):
        log.error("could not write: %s: %s", type(args.exc_value).__name__, args.exc_value)
    else:
        threading.__excepthook__(args)


def stopped(reason: str) -> None:
    """A sweep (or run) that cannot go on: one line, and what the finished jobs say."""
    if Sweep.active is not None:
        unlock(Sweep.active)
        text, failed, _ = summarize(Sweep.active)
        print(text)
        if failed:
            print(f"{len(failed)} job(s) failed: " + "; ".join(failed), file=sys.stderr)
    sys.exit(f"error: stopped: {reason}")


def describe_ctrl_c() -> str:
    """The line startup.py's handler prints: in a sweep, how to finish it (its lock freed)."""
    if Sweep.active is None:
        return startup.NOT_STARTED
    unlock(Sweep.active)
    return f"{startup.NOT_STARTED}; to continue, rerun the sweep with {resume_args(Sweep.active)}"


def interrupted_outside_jobs() -> None:
    """Ctrl-C outside a job's start and training: between a sweep's jobs, in the parallel
    launcher's wait, after a job ended. One line and exit status 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    startup.discard_all()
    line = "interrupted" if Job.started else startup.NOT_STARTED
    if Sweep.active is not None:
        unlock(Sweep.active)
        line = f"interrupted; to continue, rerun the sweep with {resume_args(Sweep.active)}"
    print(f"error: {line}", file=sys.stderr)
    sys.exit(startup.EXIT_STATUS)
