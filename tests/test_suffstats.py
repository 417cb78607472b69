"""The sufficient-statistics pass on every storage, split into many runs (donors / genes) and threads."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from scverse_nullfit._core import _suffstats
from scverse_nullfit._core._design import Donors
from scverse_nullfit._core._read import Chunk
from scverse_nullfit._core._suffstats import Accumulator, sufficient_stats

from .test_scale import _naive_stats


@pytest.fixture(scope="module")
def data():
    """300 cells of 37 donors (in no order) x 150 genes: sparse genes, dense genes with a large mean, an empty one."""
    rng = np.random.default_rng(5)
    n, n_donors, G = 300, 37, 150
    codes = rng.integers(0, n_donors, n)
    codes[:n_donors] = np.arange(n_donors)
    Y = rng.gamma(2.0, 1.0, (n, G)) * (rng.random((n, G)) < rng.uniform(0.05, 0.6, G))
    Y[:, 10:20] = 1e4 + rng.standard_normal((n, 10))  # no zeros, large mean: centred value by value
    Y[:, 30] = 0.0
    X = np.column_stack(
        [np.ones(n), rng.standard_normal(n), rng.integers(0, 2, n), rng.standard_normal(n_donors)[codes]]
    )
    donors = Donors(
        ids=np.array([f"d{i}" for i in range(n_donors)]), codes=codes, counts=np.bincount(codes).astype(float)
    )
    return Y.astype(np.float32), X, donors


GENES = {"all": np.arange(150), "range": np.arange(5, 140), "scattered": np.array([149, 12, 3, 30, 77, 11, 100])}


@pytest.mark.parametrize("form", ["csr", "csr_by_donor", "csc", "dense"])
@pytest.mark.parametrize("genes", list(GENES))
def test_runs_and_threads(monkeypatch, data, form, genes):
    """Runs of a few hundred stored values (dozens of runs, blocks of more than 64 genes): the naive sums, and the
    same bits on 1 or 3 threads."""
    Y, X, donors = data
    monkeypatch.setattr(_suffstats, "RUN_ELEMENTS", 400)
    if form == "csr_by_donor":  # cells already in donor order: runs are views of the rows
        order = np.argsort(donors.codes, kind="stable")
        Y, X = Y[order], X[order]
        donors = Donors(ids=donors.ids, codes=donors.codes[order], counts=donors.counts)
    M = {"csr": sparse.csr_matrix, "csr_by_donor": sparse.csr_matrix, "csc": sparse.csc_matrix, "dense": np.asarray}
    idx = GENES[genes]
    one, three = (sufficient_stats(M[form](Y), idx, donors, X, n_threads=t) for t in (1, 3))
    S, XtY, mean, M2 = _naive_stats(Y, idx, donors, X)
    np.testing.assert_allclose(one.S, S, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(one.XtY, XtY, rtol=1e-12, atol=1e-8)
    np.testing.assert_allclose(one.mean, mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(one.M2, M2, rtol=1e-9, atol=1e-10)
    for name in ("S", "XtY", "mean", "M2"):
        np.testing.assert_array_equal(getattr(three, name), getattr(one, name))


def test_chunks_of_cells_add_up(monkeypatch, data):
    """CSR chunks of cells (donors recurring across chunks) and dense chunks, in any mix, give the whole's sums."""
    Y, X, donors = data
    monkeypatch.setattr(_suffstats, "RUN_ELEMENTS", 300)
    genes = np.arange(Y.shape[1])
    acc = Accumulator(donors.codes, len(donors.ids), X, genes, Y.shape[1], n_threads=2)
    for a in range(0, Y.shape[0], 70):
        block = Y[a : a + 70]
        if (a // 70) % 2:
            acc.add(Chunk("dense", a, a + len(block), array=block))
        else:
            B = sparse.csr_matrix(block)
            acc.add(Chunk("csr", a, a + len(block), B.indptr, B.indices, B.data))
    stats = acc.result()
    S, XtY, mean, M2 = _naive_stats(Y, genes, donors, X)
    np.testing.assert_allclose(stats.S, S, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stats.XtY, XtY, rtol=1e-12, atol=1e-8)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(stats.M2, M2, rtol=1e-9, atol=1e-10)


def test_integer_and_float64_values(data):
    """Integer counts and float64 values (summed where they lie) give the same sums as float32 ones."""
    Y, X, donors = data
    genes = np.arange(Y.shape[1])
    ref = sufficient_stats(sparse.csr_matrix(Y), genes, donors, X)
    for values in (np.rint(Y).astype(np.int64), Y.astype(np.float64)):
        stats = sufficient_stats(sparse.csr_matrix(values), genes, donors, X)
        S, _, _, M2 = _naive_stats(values, genes, donors, X)
        np.testing.assert_allclose(stats.S, S, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(stats.M2, M2, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(sufficient_stats(sparse.csr_matrix(Y.astype(np.float64)), genes, donors, X).S, ref.S)
