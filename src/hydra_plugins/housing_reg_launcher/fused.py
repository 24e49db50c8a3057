"""hydra/sweeper=fused (the default): a sweep's jobs that can share a fit run as one task.

Fusion sits in front of whichever launcher runs the sweep (basic, parallel, ray_cluster,
slurm): FusingLauncher composes every job's config as Hydra would, groups the jobs that may
train together (housing_reg.fuse), writes each group to SWEEP/.fused/K/group.pkl, and hands
the inner launcher one task per group, whose config its loader serves composed already
(Composed). The task (train.main with fuse.group set) writes each job's .hydra/ as Hydra's
run_job does, trains the group, and returns one value per job; the launcher turns those back
into one JobReturn per job, so Hydra, the Optuna sweeper and the sweep's summary see the jobs
they asked for, numbered as Hydra numbers them.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf._utils import get_omega_conf_dumper

from housing_reg import forking, fuse, startup
from housing_reg.lost import NoResult, record_lost_job
from housing_reg.sweep import check_job_dirs

log = logging.getLogger(__name__)
GROUPS = ".fused"  # SWEEP/.fused/K: each group's pickled job configs and its task's log


class FusingLauncher(Launcher):
    """Wraps the sweep's launcher: each fused group becomes one of its tasks."""

    def __init__(self, inner: Launcher, hydra_context: HydraContext, config: DictConfig):
        self.inner, self.hydra_context, self.config = inner, hydra_context, config
        self.dirs: list[str] = []  # every job directory launched so far

    def setup(self, **kwargs: Any) -> None:  # the inner launcher is set up already
        pass

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
        cap = fuse.cap(jobs[0].fuse.max_replicas)
        tasks = {id(j): task_config(j) for j in jobs}  # each job's, as Hydra hands it over
        groups = fuse.groups(
            jobs,
            lambda j: fuse.fit_key(OmegaConf.to_container(tasks[id(j)], resolve=False)),
            lambda j: int(j.model.replicas),
            cap,
        )
        if all(len(g) == 1 for g in groups):
            return self.inner.launch(job_overrides, initial_job_idx)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        launched, ready = [], {}
        for group in groups:
            k = group[0].hydra.job.num
            path = sweep_dir / GROUPS / str(k) / "group.pkl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(group))
            where = [f"fuse.group='{path}'", f"hydra.sweep.subdir={GROUPS}/{k}"]
            where.append("hydra.output_subdir=null")
            # The first job's overrides too: the task composes as the jobs do (a sweeper chosen
            # by hparams_search, say), though it trains the configs in group.pkl.
            i = k - initial_job_idx
            launched.append([*job_overrides[i], *where])
            task = extended(self.loaded(job_overrides[i], *parsed[i], composed), where)
            ready[tuple(launched[-1])] = pickle.dumps(task)
            models = sum(int(j.model.replicas) for j in group)
            log.info(f"group {k}: {len(group)} jobs, {models} models, one task")
            for j in group:
                shown = " ".join(filter_overrides(j.hydra.overrides.task))
                log.info(f"\t#{j.hydra.job.num} : {shown}")
        # The inner launcher asks its config loader for each task's config: this one has them
        # composed already (0.25 s a task saved), and asks Hydra for any other. (Hydra's
        # launchers keep the loader as hydra_context; one that does not composes as before.)
        context = getattr(self.inner, "hydra_context", None)
        if isinstance(context, HydraContext):
            loader = Composed(context.config_loader, ready)
            self.inner.hydra_context = dataclasses.replace(context, config_loader=loader)
        try:
            returns = self.inner.launch(launched, initial_job_idx)
        finally:
            if isinstance(context, HydraContext):
                self.inner.hydra_context = context
        for group, r in zip(groups, returns, strict=True):
            if isinstance(r, NoResult):  # Slurm ended the group's task: each job's record
                for j in group:
                    lost = dataclasses.replace(r, job_dir=str(j.hydra.runtime.output_dir))
                    lost.overrides = list(j.hydra.overrides.task)
                    record_lost_job(lost)
        return [
            job_return(j, tasks[id(j)], r)
            for group, r in zip(groups, returns, strict=True)
            for j in group
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
        (compose_shapes), or, for the other jobs of that shape, one derived from it: its
        config copied, the job's values applied by Hydra's own function, and the two hydra
        fields the overrides name recomputed as Hydra computes them (tests/test_fuse.py
        compares every file with Hydra's own)."""
        first, base = composed[shape]
        if tuple(overrides) == first:
            return pickle.loads(base)
        values = [o for o, p in zip(parsed, plain, strict=True) if p]
        return derive(base, values, parsed, self.config)

    def compose(self, idx: int, cfg: DictConfig) -> DictConfig:
        """The job's config (loaded) as a launcher makes it: numbered, its output directory
        resolved here."""
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        # The directory as Hydra resolves it, with this job's config as HydraConfig; set (a
        # copy of its hydra node, 10 ms) only where the directory names the hydra: resolver.
        master = HydraConfig.instance().cfg
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        if "hydra:" in f"{sweep['dir']}{sweep['subdir']}":
            HydraConfig.instance().set_config(cfg)
        out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out.absolute())
        HydraConfig.instance().cfg = master
        return cfg


_COMPOSING: tuple[Any, DictConfig] | None = None  # (config loader, sweep config), for workers


def compose_pickled(overrides: Sequence[str]) -> bytes:
    """Hydra's composition of a job (load_sweep_config, as its launchers call it), pickled."""
    loader, master = _COMPOSING
    return pickle.dumps(loader.load_sweep_config(master, list(overrides)))


class Composed:
    """A launcher's config loader with some of its answers known already: load_sweep_config
    returns a copy of the config kept for those overrides, and asks the wrapped loader for any
    other. Pickled without them (a launcher that runs its tasks elsewhere, ray or slurm, may
    send its loader with every task): a task composes its own config there, as Hydra would."""

    def __init__(self, loader: Any, ready: dict[tuple[str, ...], bytes]):
        self.loader, self.ready = loader, ready

    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "ready": {}}

    def load_sweep_config(self, master: DictConfig, overrides: list[str]) -> DictConfig:
        ready = self.ready.get(tuple(overrides))
        if ready is None:
            return self.loader.load_sweep_config(master, overrides)
        return pickle.loads(ready)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "ready") or name.startswith("__"):  # while being unpickled
            raise AttributeError(name)
        return getattr(self.loader, name)


def extended(cfg: DictConfig, more: list[str]) -> DictConfig:
    """cfg, load_sweep_config's config for some overrides, as it would compose them followed
    by `more`: overrides that set plain settings, hydra's or the job's, none of them choosing
    a config of a group (which would change what is composed)."""
    extra = OverridesParser.create().parse_overrides(more)
    ConfigLoaderImpl._apply_overrides_to_config(extra, cfg)
    task = OverridesParser.create().parse_overrides(list(cfg.hydra.overrides.task))
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.hydra.extend([o.input_line for o in extra if o.is_hydra_override()])
        name_task(cfg, [*task, *(o for o in extra if not o.is_hydra_override())])
    return cfg


def name_task(cfg: DictConfig, task: list[Override]) -> None:
    """hydra.overrides.task and hydra.job.override_dirname for the job's own overrides (not
    hydra's), as Hydra's _load_configuration_impl sets them."""
    cfg.hydra.overrides.task = [o.input_line for o in task]
    names = cfg.hydra.job.config.override_dirname
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=task,
        kv_sep=names.kv_sep,
        item_sep=names.item_sep,
        exclude_keys=names.exclude_keys,
    )


_ABSENT = object()


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


def derive(
    base: bytes, values: list[Override], overrides: list[Override], master: DictConfig
) -> DictConfig:
    """base's config (pickled: a copy unpickles in a third of deepcopy's time) with this job's
    values and overrides, as load_sweep_config would compose it (its
    _load_configuration_impl: the overrides applied, then hydra.overrides.task and
    hydra.job.override_dirname from them; the master's resolver cache copied)."""
    cfg = pickle.loads(base)
    task = [o for o in overrides if not o.is_hydra_override()]
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        name_task(cfg, task)
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    return cfg


_ENTRIES: dict[str, str] = {}  # the YAML text of one entry, by its contents' repr


def yaml_of(container: dict[str, Any], inside: str | None = None) -> str:
    """OmegaConf.to_yaml's text of a plain container (to_container's output), made entry by
    entry: a block mapping's text is its entries' texts in a row, and a sweep's jobs share
    most entries (hydra.help, hydra.launcher, data, ...), each dumped once per process.
    inside: the one top-level key whose own entries are the units (hydra.yaml is all hydra)."""
    node = container.get(inside) if inside is not None and len(container) == 1 else None
    if node:
        head = f"{inside}:\n"
        return head + "".join(entry_yaml({inside: {k: v}})[len(head) :] for k, v in node.items())
    if not container:
        return entry_yaml(container)
    return "".join(entry_yaml({k: v}) for k, v in container.items())


def entry_yaml(entry: dict[str, Any]) -> str:
    """yaml.dump as OmegaConf.to_yaml calls it (its dumper and options), kept by repr."""
    key = repr(entry)
    text = _ENTRIES.get(key)
    if text is None:
        if len(_ENTRIES) > 10_000:  # a long-lived process: bounded
            _ENTRIES.clear()
        text = _ENTRIES[key] = yaml.dump(
            entry,
            default_flow_style=False,
            allow_unicode=True,
            sort_keys=False,
            Dumper=get_omega_conf_dumper(),
        )
    return text


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config without its hydra node, as Hydra's run_job makes it."""
    return copy_keeping(cfg, lambda key: key != "hydra")


def hydra_config(cfg: DictConfig) -> DictConfig:
    """The job's hydra node alone, {hydra: ...}, as run_job's JobReturn holds it."""
    return copy_keeping(cfg, lambda key: key == "hydra")


def copy_keeping(cfg: DictConfig, keep: Callable[[str], bool]) -> DictConfig:
    """A copy of cfg (by pickle: a third of deepcopy's time) with the other top-level keys
    deleted, as run_job deletes the hydra node from its copy."""
    copy = pickle.loads(pickle.dumps(cfg))
    with read_write(copy), open_dict(copy):
        for key in [k for k in copy if not keep(str(k))]:
            del copy[key]
    return copy


def job_return(job: DictConfig, task: DictConfig, group: JobReturn) -> JobReturn:
    """One job's JobReturn (task: its task_config) out of its group task's."""
    ret = JobReturn(
        overrides=list(job.hydra.overrides.task),
        cfg=task,
        hydra_cfg=hydra_config(job),
        working_dir=group.working_dir,
        task_name=group.task_name,
        status=group.status,
    )
    if group.status == JobStatus.COMPLETED:
        values = group.return_value  # {job number: value}; None from a task Slurm ended
        ret._return_value = values[int(job.hydra.job.num)] if isinstance(values, dict) else None
    else:
        ret._return_value = group._return_value  # the task's exception, raised on access
    return ret


def run_group(path: str, run: Callable[[list[DictConfig]], list[Any]]) -> dict[int, Any]:
    """The group task: each job's directory set up as Hydra's run_job would (.hydra/ with its
    config, hydra config and overrides; its train.log), then run(configs) on the jobs'
    resolved configs; returns {job number: value}."""
    group: list[DictConfig] = pickle.loads(Path(path).read_bytes())
    startup.starting(job.hydra.runtime.output_dir for job in group)  # a Ctrl-C now: discarded
    configs, handlers = [], []
    root = logging.getLogger()
    try:
        for job in group:
            # ${hydra:...} in the job's config now resolves to this job's values: set_config's
            # effect, without its copy of the hydra node (10 ms a job).
            HydraConfig.instance().cfg = job
            out = Path(job.hydra.runtime.output_dir)
            if job.hydra.output_subdir is not None:
                meta = out / str(job.hydra.output_subdir)
                meta.mkdir(parents=True, exist_ok=True)
                plain = OmegaConf.to_container(job, resolve=False, enum_to_str=True)
                hydra = {"hydra": plain.pop("hydra")}
                (meta / "config.yaml").write_text(yaml_of(plain))
                (meta / "hydra.yaml").write_text(yaml_of(hydra, inside="hydra"))
                (meta / "overrides.yaml").write_text(OmegaConf.to_yaml(job.hydra.overrides.task))
            handler = logging.FileHandler(out / f"{job.hydra.job.name}.log")
            handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
            root.addHandler(handler)
            handlers.append(handler)
            task = task_config(job)
            OmegaConf.resolve(task)  # ${hydra:...} with this job's values, set above
            configs.append(task)
        values = run(configs)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    return {int(job.hydra.job.num): v for job, v in zip(group, values, strict=True)}


class FusedSweeper(BasicSweeper):
    """Hydra's basic sweeper, its launcher behind a FusingLauncher. Hydra's own check that
    every job composes is left out: FusingLauncher composes every job anyway."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None):
        # Not BasicSweeper.__init__: Hydra's plugin scan re-imports its module, and its
        # super(BasicSweeper, self) then names a class this one no longer derives from.
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = FusingLauncher(self.launcher, hydra_context, config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        pass


try:  # the `tune` extra: hparams_search=optuna, whose batches of trials fuse as well
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # without the extra, hparams_search=optuna names it (cli.check_choices)
    FusedOptunaSweeper = None
else:

    class FusedOptunaSweeper(OptunaSweeper):  # type: ignore[no-redef]
        """Hydra's Optuna sweeper, its launcher behind a FusingLauncher: the trials of one
        batch (hydra.sweeper.n_jobs of them) that can share a fit train as one task."""

        def setup(
            self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
        ) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            inner = self.sweeper.launcher
            self.sweeper.launcher = FusingLauncher(inner, hydra_context, config)
