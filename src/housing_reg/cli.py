"""The command line's policy: group choices checked first, one-line errors, exit codes, what a
run says when it ends, and the sweep's summary, lock and resume hints.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from housing_reg import startup
from housing_reg.jobdir import write_failure
from housing_reg.settings import USER_ERRORS, ConfigError
from housing_reg.startup import Interrupted, NotStarted
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


MODES = ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--run", "-r")


def check_modes(args: list[str]) -> None:
    """-m with --cfg (or --info): Hydra allows one mode at a time and says so in a traceback."""
    if not {"-m", "--multirun"} & set(args):
        return
    other = next((a for a in args if a.split("=")[0] in MODES), None)
    if other is not None:
        raise ConfigError(
            f"{other} shows one job and cannot be combined with -m: drop -m and give each "
            "setting one value (e.g. head=relu) to see that job's config"
        )


def quiet_write_errors(args: threading.ExceptHookArgs) -> None:
    """TensorBoard writes event files from a thread; a full disk there is one line, not a
    traceback (the job's next write raises it again, and that fails the job)."""
    if isinstance(args.exc_value, OSError):
        log.error("could not write: %s: %s", type(args.exc_value).__name__, args.exc_value)
    else:
        threading.__excepthook__(args)


def non_ascii_hint(args: list[str]) -> str:
    """Hydra's override lexer accepts only ASCII outside quotes: say how to quote a value."""
    odd = next((a for a in args if "=" in a and not a.isascii()), None)
    if odd is None:
        return ""
    key, _, value = odd.partition("=")
    if value[:1] in "'\"":
        return ""
    return f"; a non-ASCII value must be quoted: '{key}=\"{value}\"'"


def stopped(reason: str) -> None:
    """A sweep (or run) that cannot go on: one line, and what the finished jobs say."""
    if Sweep.active is not None:
        unlock(Sweep.active)
        text, failed, _ = summarize(Sweep.active)
        print(text)
        if failed:
            print(f"{len(failed)} job(s) failed: " + "; ".join(failed), file=sys.stderr)
    sys.exit(f"error: stopped: {reason}")


PATH_KEYS = ("ckpt_path", "data.path", "output_dir", "hydra.run.dir", "hydra.sweep.dir")
CHAR_KEYS = ("data.delimiter", "data.decimal")


def quote_paths(args: list[str]) -> list[str]:
    """Quote a path that holds '=' (every sweep job's directory does: 0_head=relu/...), which
    Hydra's override grammar would otherwise reject: ckpt_path=JOB/checkpoints/last.ckpt works
    as typed. A value without '=' is left alone, so data.path=a.csv,b.csv still sweeps.
    Likewise a character for data.delimiter or data.decimal (';' and ',' are grammar to Hydra,
    and the shell strips the quotes of data.delimiter=';'), and \\t for a tab."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in PATH_KEYS and "=" in value and value[:1] not in "'\"":
            arg = (
                f"{key}='{value.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"
            )
        elif (
            sep
            and key.lstrip("+") in CHAR_KEYS
            and (value == "\\t" or (len(value) == 1 and value not in "'\"\\"))
        ):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def check_output_dirs(args: list[str]) -> None:
    """hydra.run.dir / hydra.sweep.dir can be created: Hydra would fail with a traceback."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and "${" not in value:
            startup.named_on_command_line(Path(value))
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"{key}={value}: cannot create that directory ({e.strerror}); "
                    "choose a writable path"
                ) from None


def run_job(train: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run one job: a failure is recorded beside the job's files and, in a sweep, logged so
    the sweep goes on (its summary lists it); alone, it exits non-zero with one line."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    Job.started = True
    startup.starting([cfg.output_dir])
    startup.guard()  # until training starts, Ctrl-C stops at once (startup.py)
    quiet_known_warnings()
    # The job's log file sits in the job dir: on a full disk, a failed write to it must not
    # print a stack trace (the error line still reaches the console).
    logging.raiseExceptions = False
    try:
        try:
            metrics = train(cfg)
        except KeyboardInterrupt:  # where train() had not got as far as its own handling
            raise NotStarted() from None
    except NotStarted:
        not_started([cfg], multirun)
    except Interrupted as e:  # stops a sweep too: Ctrl-C means stop
        record_failure(cfg, "interrupted", e)
        sys.exit(f"error: {e}; to continue, {resume_hint(cfg, multirun)}")
    except Exception as e:
        record_failure(cfg, "failed", e)
        expected = isinstance(e, (*USER_ERRORS, OSError))  # OSError: a full disk, a bad path
        if not multirun:
            if expected:
                sys.exit(f"error: {one_line(e)}")
            raise  # a bug: show the traceback
        # The sweep goes on; its summary lists this job. A bug's traceback goes to the job log.
        log.error("job failed: %s", one_line(e), exc_info=not expected)
        return None
    if not multirun:
        unit = metrics.get("target", {}).get("unit", "")
        print(
            f"test MAE {metrics['test/mae']:.3f}{' ' + unit if unit else ''} "
            f"(train {metrics['train/mae']:.3f}); results in {cfg.output_dir}"
        )
    return objective(metrics)


def run_jobs(
    train_jobs: Callable[[list[DictConfig]], list[Any]], cfgs: list[DictConfig]
) -> list[float | None]:
    """A fused sweep's task: run_job's policy for each of its jobs. A failed job is recorded
    and logged, the others go on; Ctrl-C records every unfinished job as interrupted."""
    Job.started = True
    startup.starting([cfg.output_dir for cfg in cfgs])
    startup.guard()
    quiet_known_warnings()
    logging.raiseExceptions = False
    try:
        try:
            outcomes = train_jobs(cfgs)
        except KeyboardInterrupt:
            raise NotStarted() from None
    except NotStarted as e:
        for cfg, outcome in zip(cfgs, e.outcomes or [None] * len(cfgs), strict=True):
            if isinstance(outcome, BaseException):  # refused before the Ctrl-C: settled
                record_failure(cfg, "failed", outcome)
        not_started(cfgs, True)
    except Interrupted as e:
        for cfg, outcome in zip(cfgs, e.outcomes or [None] * len(cfgs), strict=True):
            if outcome is None:
                record_failure(cfg, "interrupted", e)
            elif isinstance(outcome, BaseException):
                record_failure(cfg, "failed", outcome)
        sys.exit(f"error: {e}; to continue, {resume_hint(cfgs[0], True)}")
    values = []
    for cfg, outcome in zip(cfgs, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            record_failure(cfg, "failed", outcome)
            values.append(None)
            if getattr(outcome, "reported", False):  # train.refused logged it as it was found
                continue
            expected = isinstance(outcome, (*USER_ERRORS, OSError))
            log.error(
                "job failed: %s: %s",
                Path(cfg.output_dir).name,
                one_line(outcome),
                exc_info=None if expected else outcome,
            )
        else:
            values.append(objective(outcome))
    return values


class Job:
    started = False  # whether a job's task has begun in this process (run_job, run_jobs)


def not_started(cfgs: list[DictConfig], multirun: bool) -> None:
    """Ctrl-C before training started, seen as an exception (startup.py's handler stops the
    process first wherever it can): the same line, exit status and clean-up as there."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    for cfg in cfgs:
        startup.discard(Path(str(cfg.output_dir)))
    line = startup.NOT_STARTED
    if multirun:
        line += f"; to continue, {resume_hint(cfgs[0], True)}"
    if Sweep.active is not None:
        unlock(Sweep.active)
    print(f"error: {line}", file=sys.stderr)
    sys.exit(startup.EXIT_STATUS)


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


def quiet_known_warnings() -> None:
    """Two warnings Lightning prints on every run that a user can do nothing about."""
    # Lightning looks for a Slurm job whenever `srun` is on PATH; a job here is one process,
    # also under hydra/launcher=slurm, so there is nothing to launch with srun.
    warnings.filterwarnings("ignore", message="The `srun` command is available")
    # lightning 2.6 calls a torch.utils._pytree API that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {text}"


def objective(metrics: dict[str, Any]) -> float | None:
    """What a sweeper (hparams_search=optuna) minimizes: validation MAE, never test MAE.

    None without a validation split (and for a failed job): Optuna marks the trial failed.
    """
    value = metrics.get("val/mae")
    return float(value) if value is not None else None


def record_failure(cfg: DictConfig, status: str, e: BaseException) -> None:
    """failure.json in the job dir; where even that cannot be written (a full disk), the
    error line still reaches the user."""
    try:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        retry = status == "interrupted" or not isinstance(e, USER_ERRORS)  # ours: a refusal
        write_failure(out, status, e, OmegaConf.to_container(cfg, resolve=True), retry)
    except Exception as again:
        log.error("could not record the failure in %s: %s", cfg.output_dir, one_line(again))


def resume_hint(cfg: DictConfig, multirun: bool) -> str:
    hc = HydraConfig.get()
    if multirun:
        return f"rerun the sweep with {resume_args(hc.sweep.dir)}"
    args = [a for a in hc.overrides.task if not a.startswith(("resume=", "hydra.run.dir="))]
    return "run: python -m housing_reg.train " + " ".join(
        [*args, "resume=true", f"hydra.run.dir={cfg.output_dir}"]
    )


# -- config-group choices --------------------------------------------------------------------
def check_choices(args: list[str]) -> None:
    """Each config-group override (head=, optim=, hydra/launcher=, ...) names an option Hydra
    can see, plugins included; otherwise one ConfigError line lists the valid ones."""
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in args if "=" in a and not a.startswith("-")]
        )
    except OverrideParseException:
        return  # Hydra's own parser error says where
    conf = files("housing_reg.conf")
    for o in overrides:
        if o.is_delete() or o.value_type not in (
            ValueType.ELEMENT,
            ValueType.CHOICE_SWEEP,
            ValueType.SIMPLE_CHOICE_SWEEP,
        ):
            continue
        group = o.key_or_group.lstrip("+")
        ours = conf / group
        if not ours.is_dir() and not group.startswith("hydra/"):
            continue  # not a config group: a plain key such as optim.lr
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        if any(v is None or v == "null" for v in values) and ours.is_dir():  # else a traceback
            drop = f"; to train without it, remove it: '~{group}'" if group in OPTIONAL else ""
            options = ", ".join(sorted(p.name.removesuffix(".yaml") for p in ours.iterdir()))
            raise ConfigError(f"{group}=null: choose one of: {options}{drop}")
        for v in values:
            if isinstance(v, str) and not (ours / f"{v}.yaml").is_file():
                check_option(group, v)  # not one of ours: a plugin's, or a typo
            elif isinstance(v, str):
                check_extra(f"{group}={v}")


OPTIONAL = ("logger",)  # config groups a run may go without ('~logger': no TensorBoard run)

# Our presets that build on a plugin's config: the extra that brings it, and its module.
PLUGIN_PRESETS = {
    "hparams_search=optuna": ("tune", "hydra_plugins.hydra_optuna_sweeper"),
    "hydra/launcher=slurm": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    "hydra/launcher=ray_cluster": ("ray", "hydra_plugins.hydra_ray_launcher"),
}


def check_extra(choice: str) -> None:
    """A preset whose plugin is not installed: name the extra, rather than Hydra's missing
    config file."""
    if choice not in PLUGIN_PRESETS:
        return
    extra, module = PLUGIN_PRESETS[choice]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{choice} needs the `{extra}` extra: pip install -e '.[{extra}]' "
            f"(or EXTRAS=dev,{extra} ./run setup)"
        ) from None


def check_option(group: str, value: str) -> None:
    """Compose with group=value alone: Hydra knows every option, plugins' included."""
    try:
        with initialize_config_module("housing_reg.conf", version_base="1.3"):
            compose("config", overrides=[f"{group}={value}"], return_hydra_config=True)
    except MissingConfigException as e:
        options = e.options or []
        raise ConfigError(
            f"{group}={value} is not an available option; choose one of: {', '.join(options)}"
        ) from None
    except Exception:
        return  # anything else: Hydra reports it in full when the run composes
