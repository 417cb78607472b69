"""Compiled kernels: numba's on-disk cache where a writable place for it exists, and compilation ahead of use.

numba writes the cache next to the source (``__pycache__``) or, when that is read-only (a system-wide install), in
the user's cache directory (``NUMBA_CACHE_DIR`` if set, else e.g. ``~/.cache/numba``). When neither can be written,
the kernels are compiled in every process instead of failing at import.
"""

from __future__ import annotations

import numba


def jit(**options):
    """``numba.njit(cache=True, nogil=True, **options)``, without the cache when no cache directory is writable."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available": compile per process
            return numba.njit(cache=False, nogil=True, **options)(fn)

    return wrap


_ahead = None


def compile_ahead(*warm_ups) -> None:
    """Run the kernels' warm-up functions (each compiles or loads its kernels) in one background thread, in order.

    The first fit in a process then compiles while its inputs are checked and stage 1 runs, instead of before each
    kernel's first use; later calls find the kernels compiled and cost microseconds. Errors are left for the kernels'
    real calls to raise.
    """
    global _ahead
    if _ahead is None:
        from concurrent.futures import ThreadPoolExecutor

        _ahead = ThreadPoolExecutor(1, thread_name_prefix="snf-compile")
    for warm_up in warm_ups:
        _ahead.submit(warm_up)
