"""The command line as typed, before Hydra reads it: paths and characters quoted where Hydra's
override grammar would trip on them, and the checks that name a mistake in one line (a
group's option, an extra a preset needs, -m with another mode, an output directory)."""

from __future__ import annotations

import importlib
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import MissingConfigException, OverrideParseException

from housing_reg import startup
from housing_reg.settings import ConfigError

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


def non_ascii_hint(args: list[str]) -> str:
    """Hydra's override lexer accepts only ASCII outside quotes: say how to quote a value."""
    odd = next((a for a in args if "=" in a and not a.isascii()), None)
    if odd is None:
        return ""
    key, _, value = odd.partition("=")
    if value[:1] in "'\"":
        return ""
    return f"; a non-ASCII value must be quoted: '{key}=\"{value}\"'"


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
