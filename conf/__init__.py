"""housing_reg's Hydra configs. Importing this package registers the resolvers they use, so
the config composes (compose API, `python -m`, an installed wheel) without any other import."""

import os
import secrets

from omegaconf import OmegaConf

# Directory names (config.yaml). uid: two runs started in the same instant never share a
# directory; cached, so every job of a sweep gets its sweep's value. path_safe: a value such as
# data.path=/tmp/x.csv names one job directory instead of nesting three.
OmegaConf.register_new_resolver(
    "uid", lambda: f"{os.getpid()}-{secrets.token_hex(2)}", use_cache=True, replace=True
)
OmegaConf.register_new_resolver(
    "path_safe", lambda s: str(s).replace("/", "_").replace("\\", "_")[:200], replace=True
)
# hydra/launcher=parallel: as many worker processes as there are cores for `threads` each.
OmegaConf.register_new_resolver(
    "housing_reg.parallel_jobs",
    lambda threads: max(1, (os.cpu_count() or 1) // int(threads)),
    replace=True,
)
