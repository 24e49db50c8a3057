"""hydra/sweeper=fused (the default): a sweep's jobs that can share a fit run as one task.

Fusion sits in front of whichever launcher runs the sweep (basic, parallel, ray_cluster,
slurm), through Hydra's public plugin interfaces only:

- `FusingLauncher` is a Launcher that instantiates the sweep's own launcher (Plugins) and
  stands in front of it: it composes every job's config as Hydra would (its config loader's
  load_sweep_config; the other jobs of a shape derived with OmegaConf.update), checks their
  directories (housing_reg.sweep), groups the jobs that may train together
  (housing_reg.fuse), writes each group for its task (housing_reg.group) and hands the inner
  launcher one task per group; it turns each task's values back into one JobReturn per job,
  so Hydra, the Optuna sweeper and the sweep's summary see the jobs they asked for, numbered
  as Hydra numbers them.
- `FusedSweeper` is the basic sweeper's cartesian product (OverridesParser, as Hydra's
  example sweeper plugin does it) with a FusingLauncher.
- `FusedOptunaSweeper` (the `tune` extra) is Hydra's Optuna sweeper, set up with a config
  whose launcher is a FusingLauncher in front of the sweep's own: the trials of one batch
  that can share a fit train as one task.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, filter_overrides
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from housing_reg import forking, fuse, group
from housing_reg.jobdir import GROUPS
from housing_reg.lost import NoResult, record_lost_job
from housing_reg.sweep import check_job_dirs

log = logging.getLogger(__name__)


class FusingLauncher(Launcher):
    """Stands in front of a launcher: each fused group becomes one of its tasks.

    launcher: the inner launcher's config node (the Optuna sweeper's case, where this class
    is the configured launcher); None: the sweep's own hydra.launcher."""

    def __init__(self, launcher: DictConfig | None = None) -> None:
        self.node = launcher
        self.dirs: list[str] = []  # every job directory launched so far

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        if self.node is not None:
            config = with_launcher(config, self.node)
        self.inner = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        parsed = [self.parse(o) for o in job_overrides]
        composed = self.compose_shapes(job_overrides, [shape for *_, shape in parsed])
        jobs = [
            self.compose(initial_job_idx + i, self.loaded(o, *parse, composed))
            for i, (o, parse) in enumerate(zip(job_overrides, parsed, strict=True))
        ]
        # Before anything trains, fused or not: one directory per job, none finished already
        # unless resumed. The batches an Optuna sweeper hands over one by one count together.
        dirs = [str(j.hydra.runtime.output_dir) for j in jobs]
        check_job_dirs([*self.dirs, *dirs], [True] * len(self.dirs) + [j.resume for j in jobs])
        self.dirs += dirs
        if not all(j.fuse.enabled and not j.hydra.job.chdir for j in jobs):
            return self.inner.launch(job_overrides, initial_job_idx)  # exactly Hydra's
        tasks = {id(j): group.task_config(j) for j in jobs}  # each job's, as Hydra hands it over
        groups = fuse.groups(
            jobs,
            lambda j: fuse.fit_key(OmegaConf.to_container(tasks[id(j)], resolve=False)),
            lambda j: int(j.model.replicas),
            fuse.cap(jobs[0].fuse.max_replicas),
        )
        if all(len(g) == 1 for g in groups):
            return self.inner.launch(job_overrides, initial_job_idx)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        launched = []
        for jobs_of in groups:
            k = int(jobs_of[0].hydra.job.num)
            path = group.write(sweep_dir, k, jobs_of)
            # The first job's overrides too: the task composes as the jobs do (a sweeper chosen
            # by hparams_search, say), though it trains the configs in group.pkl.
            launched.append(
                [
                    *job_overrides[k - initial_job_idx],
                    f"fuse.group='{path}'",
                    f"hydra.sweep.subdir={GROUPS}/{k}",
                    "hydra.output_subdir=null",
                ]
            )
            models = sum(int(j.model.replicas) for j in jobs_of)
            log.info(f"group {k}: {len(jobs_of)} jobs, {models} models, one task")
            for j in jobs_of:
                log.info(
                    f"\t#{j.hydra.job.num} : {' '.join(filter_overrides(j.hydra.overrides.task))}"
                )
        returns = self.inner.launch(launched, initial_job_idx)
        for jobs_of, r in zip(groups, returns, strict=True):
            if isinstance(r, NoResult):  # Slurm ended the group's task: each job's record
                for j in jobs_of:
                    record_lost_job(
                        NoResult(
                            overrides=list(j.hydra.overrides.task),
                            status=r.status,
                            job_dir=str(j.hydra.runtime.output_dir),
                            slurm_id=r.slurm_id,
                            state=r.state,
                            log=r.log,
                        )
                    )
        return [
            job_return(j, tasks[id(j)], r)
            for jobs_of, r in zip(groups, returns, strict=True)
            for j in jobs_of
        ]

    def parse(self, overrides: Sequence[str]) -> tuple[list[Override], list[bool], tuple]:
        """A job's overrides parsed, which of them are plain values (plain_value), and its
        shape: the overrides with those values left out. Jobs of one shape differ only in the
        values of plain settings (seed=3 where another has seed=0)."""
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        plain = [plain_value(o, self.config) for o in parsed]
        shape = tuple(
            (o.key_or_group, None if p else o.input_line)
            for o, p in zip(parsed, plain, strict=True)
        )
        return parsed, plain, shape

    def compose_shapes(
        self, job_overrides: Sequence[Sequence[str]], shapes: list[tuple]
    ) -> dict[tuple, tuple[tuple[str, ...], bytes]]:
        """Hydra's composition of the first job of each shape, pickled, by shape. A composition
        takes about 0.25 s; several are made side by side in forked workers where the machine
        has the cores (forking.py), else here, one after the other."""
        firsts: dict[tuple, tuple[str, ...]] = {}
        for overrides, shape in zip(job_overrides, shapes, strict=True):
            firsts.setdefault(shape, tuple(overrides))
        todo = list(firsts.values())
        global _COMPOSING
        _COMPOSING = (self.hydra_context.config_loader, self.config)
        try:
            done = None
            if n := forking.workers(len(todo)):
                try:
                    pool = multiprocessing.get_context("fork").Pool(n, forking.default_signals)
                    with pool:
                        done = pool.map(compose_pickled, todo)
                except Exception:  # e.g. an unknown choice: raised again here, as Hydra does
                    done = None
            if done is None:
                done = [compose_pickled(o) for o in todo]
        finally:
            _COMPOSING = None  # the workers are gone: nothing keeps the loader
        return {shape: (o, b) for (shape, o), b in zip(firsts.items(), done, strict=True)}

    def loaded(
        self,
        overrides: Sequence[str],
        parsed: list[Override],
        plain: list[bool],
        shape: tuple,
        composed: dict[tuple, tuple[tuple[str, ...], bytes]],
    ) -> DictConfig:
        """The job's config as load_sweep_config returns it: the composition of its shape
        (compose_shapes), or, for the other jobs of that shape, one derived from it (derive;
        tests/test_fuse.py compares every file with Hydra's own)."""
        first, base = composed[shape]
        if tuple(overrides) == first:
            return pickle.loads(base)
        values = [o for o, p in zip(parsed, plain, strict=True) if p]
        return derive(base, values, parsed, self.config)

    def compose(self, idx: int, cfg: DictConfig) -> DictConfig:
        """The job's config (loaded) as a launcher makes it: numbered, its output directory
        resolved here, with this job's config as HydraConfig where the directory names the
        hydra: resolver (HydraConfig.set_config copies the hydra node: 10 ms)."""
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        named = "hydra:" in f"{sweep['dir']}{sweep['subdir']}"
        if named:
            HydraConfig.instance().set_config(cfg)
        out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        if named:
            HydraConfig.instance().set_config(self.config)
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out.absolute())
        return cfg


def with_launcher(config: DictConfig, node: DictConfig) -> DictConfig:
    """A copy of config whose hydra.launcher is node."""
    copy = pickle.loads(pickle.dumps(config))
    with read_write(copy.hydra), open_dict(copy.hydra):
        OmegaConf.update(copy, "hydra.launcher", node, merge=False)
    return copy


_COMPOSING: tuple[Any, DictConfig] | None = None  # (config loader, sweep config), for workers


def compose_pickled(overrides: Sequence[str]) -> bytes:
    """Hydra's composition of a job (load_sweep_config, as its launchers call it), pickled."""
    loader, master = _COMPOSING
    return pickle.dumps(loader.load_sweep_config(master, list(overrides)))


def plain_value(o: Override, master: DictConfig) -> bool:
    """`key=value` that sets one existing setting of the job: not a config group (a dict in
    the config: head, data, ...), not hydra's own, no + or ~, no sweep. A job that differs
    from another only in the values of these can be derived from it."""
    if o.type != OverrideType.CHANGE or o.is_hydra_override() or o.is_sweep_override():
        return False
    if "/" in o.key_or_group or o.package is not None:
        return False
    node = OmegaConf.select(master, o.key_or_group, default=_ABSENT, throw_on_missing=False)
    return node is not _ABSENT and not isinstance(node, DictConfig)


_ABSENT = object()


def derive(
    base: bytes, values: list[Override], overrides: list[Override], master: DictConfig
) -> DictConfig:
    """base's config (pickled: a copy unpickles in a third of deepcopy's time) with this job's
    values and overrides, as load_sweep_config would compose it: each value set as Hydra sets
    a plain `key=value` (OmegaConf.update, merged), then hydra.overrides.task and
    hydra.job.override_dirname from the job's overrides, and the master's resolver cache."""
    cfg = pickle.loads(base)
    for o in values:
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    task = [o for o in overrides if not o.is_hydra_override()]
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in task]
        names = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = override_dirname(
            task, names.exclude_keys, names.item_sep, names.kv_sep
        )
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    return cfg


def override_dirname(
    overrides: Sequence[Override], exclude: Sequence[str], item_sep: str, kv_sep: str
) -> str:
    """hydra.job.override_dirname as Hydra documents it: the job's overrides but the excluded
    keys, sorted, joined by item_sep, each `=` written kv_sep."""
    lines = sorted(o.input_line for o in overrides if o.key_or_group not in exclude)
    return re.sub("=", kv_sep, item_sep.join(lines))


def job_return(job: DictConfig, task: DictConfig, task_return: JobReturn) -> JobReturn:
    """One job's JobReturn (task: its task config) out of its group task's."""
    ret = JobReturn(
        overrides=list(job.hydra.overrides.task),
        cfg=task,
        hydra_cfg=group.hydra_config(job),
        working_dir=task_return.working_dir,
        task_name=task_return.task_name,
        status=task_return.status,
    )
    try:
        values = task_return.return_value  # {job number: value}; None from a task Slurm ended
    except Exception as e:  # the task failed: each of its jobs reports its exception
        ret.return_value = e
    else:
        ret.return_value = values[int(job.hydra.job.num)] if isinstance(values, dict) else None
    return ret


def expand(overrides: list[Override]) -> list[list[str]]:
    """Every job's overrides: the cartesian product of the discrete sweeps, as Hydra's basic
    sweeper makes it (key order kept, the last override of a key winning)."""
    lists: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            lists[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            lists[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise HydraException(
                f"{key}: the fused sweeper sweeps lists and ranges, not {o.value_type.name}; "
                "an interval needs a search, e.g. hparams_search=optuna"
            )
    return [list(x) for x in itertools.product(*lists.values())]


class FusedSweeper(Sweeper):
    """Hydra's basic sweep (every combination of the swept values, in batches of
    max_batch_size), each batch launched by a FusingLauncher."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None):
        self.max_batch_size = max_batch_size
        self.params = params or {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = FusingLauncher()
        self.launcher.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        params = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = expand(parser.parse_overrides(params))
        size = self.max_batch_size if self.max_batch_size not in (None, -1) else len(jobs)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = []
        for start in range(0, len(jobs), max(size, 1)):
            batch = jobs[start : start + size]
            results = self.launcher.launch(batch, initial_job_idx=start)
            for r in results:
                _ = r.return_value  # raises a failed job's exception, as Hydra's sweeper does
            returns.append(results)
        return returns


try:  # the `tune` extra: hparams_search=optuna, whose batches of trials fuse as well
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # without the extra, hparams_search=optuna names it (argv.check_choices)
    FusedOptunaSweeper = None
else:

    class FusedOptunaSweeper(Sweeper):  # type: ignore[no-redef]
        """Hydra's Optuna sweeper, set up with a config whose launcher is a FusingLauncher in
        front of the sweep's own (with_launcher): the trials of one batch
        (hydra.sweeper.n_jobs of them) that can share a fit train as one task."""

        def __init__(self, **settings: Any) -> None:
            self.optuna = OptunaSweeper(**settings)

        def setup(
            self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
        ) -> None:
            fused = OmegaConf.create(
                {
                    "_target_": f"{FusingLauncher.__module__}.{FusingLauncher.__qualname__}",
                    "_recursive_": False,  # the inner launcher: FusingLauncher.setup makes it
                    "launcher": config.hydra.launcher,
                }
            )
            self.optuna.setup(
                hydra_context=hydra_context,
                task_function=task_function,
                config=with_launcher(config, fused),
            )

        def sweep(self, arguments: list[str]) -> Any:
            return self.optuna.sweep(arguments)
