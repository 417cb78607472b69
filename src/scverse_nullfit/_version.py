"""The installed version (a leaf, so the command line can print it without importing the package's tools)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scverse-nullfit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
