"""Exact, fast null linear mixed models for single-cell eQTL mapping."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, get, io, pl, tl

try:
    __version__ = version("scverse-nullfit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__", "datasets", "get", "io", "pl", "tl"]
