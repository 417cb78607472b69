"""Exact, fast null linear mixed models for single-cell eQTL mapping.

The subpackages (``datasets``, ``get``, ``io``, ``pl``, ``tl``) are imported on first use, so that the command
line starts without importing scanpy.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from . import datasets, get, io, pl, tl

_SUBPACKAGES = ("datasets", "get", "io", "pl", "tl")
__all__ = ["__version__", "datasets", "get", "io", "pl", "tl"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
