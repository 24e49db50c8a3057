"""housing_reg: why sigmoid and tanh output heads fail on regression, as a reproducible sweep."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("housing_reg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
