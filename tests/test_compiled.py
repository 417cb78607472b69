"""Compiled kernels without a writable cache directory; the Gaussian fit compiles nothing."""

from __future__ import annotations

import numba
import pytest
from numba.core import caching

from scverse_nullfit._core import _reml, _suffstats
from scverse_nullfit._core._compiled import jit


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


def test_the_gaussian_path_has_no_compiled_kernels():
    """The pass and the REML are numpy/scipy code: a first Gaussian fit waits for no compiler (issue 13)."""
    for module in (_suffstats, _reml):
        kernels = [k for k, v in vars(module).items() if isinstance(v, numba.core.registry.CPUDispatcher)]
        assert not kernels, (module.__name__, kernels)
