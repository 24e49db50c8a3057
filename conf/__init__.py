"""housing_reg's Hydra configs. Importing this package registers the resolvers they use, so
the config composes (compose API, `python -m`, an installed wheel) without any other import."""

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

from housing_reg import cores

# Directory names (config.yaml). uid: two runs started in the same instant never share a
# directory; cached, so every job of a sweep gets its sweep's value. path_safe: a value such as
# data.path=/tmp/x.csv names one job directory instead of nesting three.
OmegaConf.register_new_resolver(
    "uid", lambda: f"{os.getpid()}-{secrets.token_hex(2)}", use_cache=True, replace=True
)
OmegaConf.register_new_resolver(
    "path_safe", lambda s: str(s).replace("/", "_").replace("\\", "_")[:200], replace=True
)


# hydra/launcher=parallel: as many worker processes as there are cores for `threads` each,
# counting the cores this process may use (taskset, a container, a Slurm allocation).
OmegaConf.register_new_resolver(
    "housing_reg.parallel_jobs",
    lambda threads: max(1, len(cores.cpus()) // int(threads)),
    replace=True,
)

# logger=mlflow: the store beside the jobs, the sweep's directory in a sweep (one store, a run
# per job), the run's own for a lone run; each job's MLflow run named by its directory.


def _runs_dir() -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    where = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir
    return str(Path(str(where)).absolute())


def _run_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    return Path(str(HydraConfig.get().runtime.output_dir)).name


OmegaConf.register_new_resolver("housing_reg.store", _runs_dir, replace=True)
OmegaConf.register_new_resolver("housing_reg.run_name", _run_name, replace=True)
