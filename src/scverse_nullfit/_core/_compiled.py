"""Compiled kernels (count families, step 2): numba's on-disk cache where a writable place for it exists.

numba writes the cache next to the source (``__pycache__``) or, when that is read-only (a system-wide install), in
the user's cache directory (``NUMBA_CACHE_DIR`` if set, else e.g. ``~/.cache/numba``). When neither can be written,
the kernels are compiled in every process instead of failing at import.
"""

from __future__ import annotations

import os

import numba


def jit(**options):
    """``numba.njit(cache=True, nogil=True, **options)``, without the cache when no cache directory is writable."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available": compile per process
            return numba.njit(cache=False, nogil=True, **options)(fn)

    return wrap


def cached_on_disk(dispatcher) -> bool:
    """Whether ``dispatcher`` is compiled in this process or its numba cache index exists on disk (so its first call
    loads rather than compiles); True when numba's cache cannot be inspected (its layout is numba's own)."""
    if dispatcher.signatures:
        return True
    cache = getattr(dispatcher, "_cache", None)
    if type(cache).__name__ == "NullCache":  # caching disabled: compiled in every process
        return False
    try:
        return os.path.exists(cache._cache_file._index_path)
    except AttributeError:
        return True
