"""housing_reg: why sigmoid and tanh output heads fail on regression, as a reproducible sweep."""

# First: `python -m housing_reg.train` then imports torch and Lightning for seconds, and a
# Ctrl-C there is one line (startup.py).
from housing_reg import startup

startup.guard_command()

# Then the cores' first look (cores.py reads /proc, nothing heavy): a fit's first choice of
# threads then covers everything other programs did while this process started.
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

from housing_reg import cores  # noqa: E402, F401

try:
    __version__ = version("housing_reg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
