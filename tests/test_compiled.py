"""Compiled kernels without a writable cache directory, and compiling them ahead of use."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba.core import caching

from scverse_nullfit._core import _suffstats
from scverse_nullfit._core._compiled import compile_ahead, jit


def _add_one(x):
    return x + 1.0


def test_jit_without_a_writable_cache_dir(monkeypatch):
    """A read-only install and home (numba finds no place for its cache) compiles per process, not an import error."""
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):  # what numba itself does at decoration
        numba.njit(cache=True)(_add_one)
    f = jit()(_add_one)
    assert f(1.0) == 2.0
    assert f._cache is None or isinstance(f._cache, caching.NullCache)  # no cache behind it


def test_warm_ups_compile_the_kernels_for_the_types_the_fit_uses():
    from scipy import sparse

    Y = sparse.random(5, 4, density=0.5, format="csr", dtype=np.float32)
    compile_ahead(lambda: _suffstats.warm_up(Y))
    _suffstats.warm_up(Y)
    assert len(_suffstats._csr_kernel.signatures) >= 1
