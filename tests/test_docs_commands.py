"""Every `python -m housing_reg.train ...` command that README.md and docs/ show still composes
and passes the package's own checks. A sweep is checked at its first value of each swept
setting (composing with Hydra's compose API: running them all would take an hour); commands
with placeholders (<job>, $PWD) and the evaluate and report commands, which need a trained
job, are run for real elsewhere (test_faults.py, test_report.py)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import OmegaConf, open_dict

from housing_reg.argv import quote_paths
from housing_reg.settings import check_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[1]
PLUGINS = {  # a command that needs an extra is checked only where the extra is installed
    "hydra/launcher=ray": "hydra_plugins.hydra_ray_launcher",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper",
    "logger=mlflow": "mlflow",
}


def shown_commands() -> list[tuple[str, str]]:
    """(file, command) for each train command in a code block of the README or docs/."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        fenced, i = False, 0
        while i < len(lines):
            line = lines[i]
            if line.strip().startswith("```"):
                fenced = not fenced
            in_code = fenced or line.startswith("    ")
            text = line.strip().removeprefix("$ ")
            if in_code and text.startswith("python -m housing_reg.train"):
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
                if "<" not in text and "$" not in text:
                    found.append((path.name, text))
            i += 1
    return found


COMMANDS = shown_commands()


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its namespace package is not there at all
        return False


def test_the_docs_show_train_commands():
    assert len(COMMANDS) >= 20  # the extraction above still finds them


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_each_shown_command_composes_and_passes_the_checks(where: str, command: str):
    # as the shell passes them, quoted where `python -m housing_reg.train` quotes them
    args = quote_paths([a for a in shlex.split(command)[3:] if a != "-m"])
    if args and args[0].startswith("--"):  # --help, --cfg job, --config-path: Hydra's own
        return
    for prefix, module in PLUGINS.items():
        if any(a.startswith(prefix) for a in args) and not installed(module):
            pytest.skip(f"{prefix} needs its extra")
    first = []
    for o in OverridesParser.create().parse_overrides(args):
        value = None
        if isinstance(o.value(), Glob):  # a config group's options, matched as Hydra would
            options = sorted(p.stem for p in (ROOT / "conf" / o.key_or_group).glob("*.yaml"))
            value = o.value().filter(options)[0]
        elif o.is_sweep_override():
            value = next(iter(o.sweep_string_iterator()))
        first.append(f"{o.get_key_element()}={value}" if value is not None else o.input_line)
    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        cfg = compose("config", overrides=first, return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ and cfg.hydra.launcher._target_, where
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    with open_dict(job):
        job.output_dir = "unused"  # ${hydra:runtime.output_dir}: set only in a real run
    check_config(job)
