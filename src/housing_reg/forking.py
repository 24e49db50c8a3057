"""Forked worker processes for work that would otherwise run in series on one core: how many
are worth starting here, and their signals. images.py draws a fit's TensorBoard images in
them, the fused sweeper (hydra_plugins/housing_reg_launcher/fused.py) composes its configs."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys


def workers(tasks: int) -> int:
    """Processes worth forking for this many tasks: none for one, else one per usable CPU.
    None in a parallel launcher's worker (its CPUs are the other jobs', and it may not have
    children) or a Ray worker (whose threads make fork unsafe)."""
    if tasks < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    ray = sys.modules.get("ray")
    if multiprocessing.current_process().daemon or (ray is not None and ray.is_initialized()):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(tasks, cpus or 1) if (cpus or 1) > 1 else 0


def default_signals() -> None:
    """A worker dies on SIGTERM (the fork copied this process's handlers: Lightning's, which
    would only set a flag) and leaves Ctrl-C to this process, which stops the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
