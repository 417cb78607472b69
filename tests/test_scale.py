"""Scale machinery on small data: streaming (backed), dask (incl. a 2-worker LocalCluster), determinism.

The fit must be the same, to 1e-10, whatever the input form, chunk size or thread count; performance itself is
measured by ``benchmarks/run.py``, not here.
"""

from __future__ import annotations

import itertools
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scverse_nullfit as snf
from scverse_nullfit._core import _read
from scverse_nullfit._core._design import align_grm, build_design, donor_labels, spectral_precompute
from scverse_nullfit._core._reml import RemlProblem, Rotation
from scverse_nullfit._core._suffstats import Accumulator, pre_residualise, scaled_residual_sums, sufficient_stats
from scverse_nullfit.tl._backend import fit_all_genes

from .conftest import ARRAY_TYPES, COVARIATES, DONOR_COVARIATES

KEYS = ["nullfit", "nullfit_beta", "nullfit_xhx_inv", "nullfit_resid_rot"]
RTOL = 1e-10


@pytest.fixture(scope="module")
def sparse_adata():
    """~300 cells, 40 related donors, 24 genes; about half the entries zero, plus an all-zero gene."""
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=24, seed=11)
    X = np.asarray(adata.X, dtype=np.float32)
    X[X < 1.5] = 0.0
    X[:, 5] = 0.0  # nothing to fit: NaN results, the others unharmed
    adata.X = X
    return adata


def _fit(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, **kwargs)
    return {key: np.asarray(adata.varm[key], dtype=np.float64) for key in KEYS}


def _assert_same(result, reference, what: str):
    for key in KEYS:
        a, b = result[key], reference[key]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN pattern of {key}")
        scale = np.nanmax(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * 1e-3 * scale, err_msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def reference(sparse_adata):
    return _fit(sparse_adata.copy())


@pytest.fixture(scope="module")
def h5ad_files(sparse_adata, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    paths = {}
    for fmt in ("csr", "csc", "dense"):
        a = sparse_adata.copy()
        for layer in list(a.layers):  # backed mode keeps only X on disk; a sparse layer would be loaded whole
            del a.layers[layer]
        a.X = sparse.csr_matrix(a.X) if fmt == "csr" else sparse.csc_matrix(a.X) if fmt == "csc" else a.X
        paths[fmt] = root / f"{fmt}.h5ad"
        a.write_h5ad(paths[fmt])
    return paths


def test_reference_sane(reference, sparse_adata):
    res = reference["nullfit"]
    assert np.isnan(res[5]).sum() >= 1  # the all-zero gene is not fitted
    fitted = np.delete(np.arange(sparse_adata.n_vars), 5)
    assert np.isfinite(res[fitted, 0]).all()


@pytest.mark.parametrize(
    "form", ["dense_f64", "csr_f64", "csc_f64", "csr_array", "dask_dense", "dask_csr", "dask_csr_2d"]
)
def test_in_memory_forms(sparse_adata, reference, form):
    a = sparse_adata.copy()
    a.X = ARRAY_TYPES[form](a.X)
    before = a.X.copy()
    _assert_same(_fit(a), reference, form)
    if form == "dense_f64":  # the input is never modified (dense float64 chunks are views of it)
        np.testing.assert_array_equal(a.X, before)


def test_layer_and_gene_subset(sparse_adata, reference):
    a = sparse_adata.copy()
    a.layers["counts"] = sparse.csr_matrix(a.X)
    a.X = np.zeros(a.shape, dtype=np.float32)
    genes = a.var_names[[0, 3, 4, 9, 17]]
    res = _fit(a, layer="counts", genes=genes)
    idx = [0, 3, 4, 9, 17]
    for key in KEYS:
        np.testing.assert_allclose(res[key][idx], reference[key][idx], rtol=RTOL, atol=1e-14)
        rest = np.delete(res[key], idx, axis=0)
        assert np.isnan(rest[:, 0] if key == "nullfit" else rest).all()  # tau (converged is False, not NaN)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize("block", [None, 97])
def test_backed(h5ad_files, reference, monkeypatch, fmt, block):
    """Backed h5ad: read in chunks (97 stored values each: dozens of chunks), never loaded whole."""
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    def refuse(*args, **kwargs):
        raise AssertionError("the backed matrix was loaded whole")

    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", refuse)
    if block is not None:
        monkeypatch.setattr(_read, "BLOCK_ELEMENTS", block)
    a = ad.read_h5ad(h5ad_files[fmt], backed="r")
    try:
        _assert_same(_fit(a), reference, f"backed {fmt}, block {block}")
        assert a.uns["nullfit"]["params"]["input"].startswith("backed")
    finally:
        a.file.close()


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_lazy_dask_from_h5ad(h5ad_files, reference, fmt):
    import h5py

    with h5py.File(h5ad_files[fmt], "r") as f:
        a = ad.AnnData(
            X=ad.experimental.read_elem_lazy(f["X"], chunks=(71, -1) if fmt == "csr" else None),
            obs=ad.io.read_elem(f["obs"]),
            var=ad.io.read_elem(f["var"]),
            uns=ad.io.read_elem(f["uns"]),
        )
        _assert_same(_fit(a), reference, f"read_elem_lazy {fmt}")
        assert a.uns["nullfit"]["params"]["input"] == "dask"


# ----------------------------------------------------------------------------------------------------------------
# the pieces: sufficient statistics and gene fits under different chunkings and thread counts
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pieces(sparse_adata):
    labels = donor_labels(sparse_adata.obs, "donor_id")
    G, donors = align_grm(sparse_adata.uns["grm"], labels, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        design = build_design(sparse_adata.obs, COVARIATES, DONOR_COVARIATES, donors)
    spectral = spectral_precompute(G, donors, design.X)
    return donors, design, spectral


def _naive_stats(Y, genes, donors, X):
    Y = np.asarray(Y, dtype=np.float64)[:, genes]
    Z = np.zeros((len(donors.codes), len(donors.ids)))
    Z[np.arange(len(donors.codes)), donors.codes] = 1.0
    mean = Y.mean(axis=0)
    return Z.T @ Y, X.T @ Y, mean, ((Y - mean) ** 2).sum(axis=0)


@pytest.mark.parametrize("form", ["dense", "csr", "csc", "csr_unsorted_int64"])
@pytest.mark.parametrize("genes", ["all", "subset"])
def test_sufficient_stats_against_numpy(sparse_adata, pieces, form, genes):
    donors, design, _ = pieces
    X = np.asarray(sparse_adata.X)
    Y = {
        "dense": lambda: X,
        "csr": lambda: sparse.csr_matrix(X),
        "csc": lambda: sparse.csc_matrix(X),
        "csr_unsorted_int64": lambda: _unsorted_int64(sparse.csr_matrix(X)),
    }[form]()
    idx = np.arange(X.shape[1]) if genes == "all" else np.array([7, 2, 19, 0])
    stats = sufficient_stats(Y, idx, donors, design.X)
    S, XtY, mean, M2 = _naive_stats(X, idx, donors, design.X)
    np.testing.assert_allclose(stats.S, S, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(stats.XtY, XtY, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.M2, M2, rtol=1e-10, atol=1e-12)
    assert stats.n_cells == X.shape[0]


def _unsorted_int64(M):
    M = M.copy()
    for i in range(M.shape[0]):  # reverse every row's entries
        a, b = M.indptr[i], M.indptr[i + 1]
        M.indices[a:b] = M.indices[a:b][::-1]
        M.data[a:b] = M.data[a:b][::-1]
    M.has_sorted_indices = False
    M.indices = M.indices.astype(np.int64)
    M.indptr = M.indptr.astype(np.int64)
    return M


def test_accumulator_merge_is_the_reduce(sparse_adata, pieces):
    """Statistics of cell subsets merged (in any grouping) equal those of all cells."""
    donors, design, _ = pieces
    X = sparse.csr_matrix(np.asarray(sparse_adata.X))
    genes = np.arange(X.shape[1])
    whole = sufficient_stats(X, genes, donors, design.X)
    cuts = [0, 1, 60, 61, 200, X.shape[0]]
    parts = []
    for a, b in itertools.pairwise(cuts):
        acc = Accumulator(donors.codes[a:b], len(donors.ids), design.X[a:b], genes, X.shape[1],
                          donor_cols=_donor_cols(design.X, donors))  # fmt: skip
        block = X[a:b]
        acc.add_csr(block.indptr, block.indices, block.data, np.arange(b - a))
        parts.append(acc.result())
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    for name in ("S", "XtY", "mean", "M2"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n_threads", [2, 3, 8])
def test_accumulator_threads(sparse_adata, pieces, n_threads):
    """Threads sum runs of whole donors: Z'y is bit-for-bit the single-threaded one, the rest to rounding."""
    donors, design, _ = pieces
    X = sparse.csr_matrix(np.asarray(sparse_adata.X))
    genes = np.arange(X.shape[1])
    results = []
    for nt in (1, n_threads):
        acc = Accumulator(donors.codes, len(donors.ids), design.X, genes, X.shape[1], n_threads=nt)
        for a in range(0, X.shape[0], 70):  # several chunks, each split between the threads
            block = X[a : a + 70]
            acc.add_csr(block.indptr, block.indices, block.data, np.arange(a, min(a + 70, X.shape[0])))
        results.append(acc.result())
    one, many = results
    np.testing.assert_array_equal(many.S, one.S)
    for name in ("XtY", "mean", "M2"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-13, atol=1e-12)
    assert many.n_cells == one.n_cells == X.shape[0]


def _donor_cols(X, donors):
    from scverse_nullfit._core._suffstats import donor_level_columns

    return donor_level_columns(X, donors.codes, len(donors.ids))


def _gene_fits(sparse_adata, pieces, *, block=None, chunk_size=None, n_threads=None, rotation=True, distributed=False):
    donors, design, spectral = pieces
    X = sparse.csr_matrix(np.asarray(sparse_adata.X))
    genes = np.arange(X.shape[1])
    stats = sufficient_stats(X, genes, donors, design.X, block_elements=block)
    pre = pre_residualise(stats, donors, spectral)
    ok = np.flatnonzero(pre.ok)
    Tt = scaled_residual_sums(pre, ok)

    def plain(sl, out):  # a rotation that is not a Rotation (not shipped to workers)
        np.copyto(out, (spectral.U.T @ Tt[:, sl]).T)
        return out

    rotate = Rotation(spectral.U, Tt) if rotation else plain
    fits = fit_all_genes(
        RemlProblem(spectral), rotate, pre.W[ok], tau=None, chunk_size=chunk_size, n_threads=n_threads,
        distributed=distributed,
    )  # fmt: skip
    return fits


def _assert_same_fits(a, b, what):
    for name in ("tau", "sigma2_e", "loglik", "loglik0", "tau_se", "beta", "Ainv", "resid"):
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=RTOL * 1e-3 * np.nanmax(np.abs(y)), err_msg=f"{what}: {name}")
    np.testing.assert_array_equal(a.converged, b.converged)


@pytest.mark.parametrize(("chunk_size", "n_threads"), [(1, 1), (5, 2), (7, 3), (None, 2)])
def test_gene_chunks_and_threads(sparse_adata, pieces, chunk_size, n_threads):
    ref = _gene_fits(sparse_adata, pieces, n_threads=1)
    other = _gene_fits(sparse_adata, pieces, chunk_size=chunk_size, n_threads=n_threads, rotation=chunk_size != 5)
    _assert_same_fits(other, ref, f"chunk_size={chunk_size}, n_threads={n_threads}")


def test_reml_bit_identical_across_threads(sparse_adata, pieces):
    """The same chunks on 1 or 3 threads give the same bits (each chunk's arithmetic does not depend on the others)."""
    one = _gene_fits(sparse_adata, pieces, chunk_size=4, n_threads=1)
    many = _gene_fits(sparse_adata, pieces, chunk_size=4, n_threads=3)
    for name in ("tau", "sigma2_e", "loglik", "tau_se", "beta", "Ainv", "resid", "n_iter", "converged"):
        np.testing.assert_array_equal(getattr(many, name), getattr(one, name), err_msg=name)


def _restricted_eigenvalues(spectral):
    """Eigenvalues of ``E = Lam^1/2 (I - X~ (X'X)^-1 X~') Lam^1/2``: the log-determinant's reference."""
    lam, Xrot = spectral.lam, spectral.Xrot
    B = np.sqrt(lam)[:, None] * Xrot
    E = np.diag(lam) - B @ np.linalg.solve(spectral.XtX, B.T)
    return np.clip(np.linalg.eigvalsh((E + E.T) / 2), 0.0, None)


@pytest.mark.parametrize("donor_level", [False, True])
def test_restricted_log_determinant(sparse_adata, pieces, donor_level):
    """The restricted log-determinant and its derivatives from the identity with log|X'H^-1X| (series at the nodes
    and direct) equal the sums over the restricted eigenvalues ``mu``."""
    donors, design, spectral = pieces
    if donor_level:  # a covariate constant within donors (A loses a direction as tau grows), on another scale
        X = np.column_stack([design.X, 1e3 * np.random.default_rng(3).standard_normal(len(donors.ids))[donors.codes]])
        G, _ = align_grm(sparse_adata.uns["grm"], donor_labels(sparse_adata.obs, "donor_id"), "test")
        spectral = spectral_precompute(G, donors, X)
    mu = _restricted_eigenvalues(spectral)
    functions = RemlProblem(spectral).functions
    taus = np.concatenate([[0.0], np.logspace(-7, 7, 57), [3.3e-11 * 1.001, 1e8]])
    ref_logdet = np.log1p(taus[:, None] * mu).sum(axis=1)
    mw = mu / (1.0 + taus[:, None] * mu)
    ref_h = np.stack([(mw**a).sum(axis=1) for a in (1, 2, 3)], axis=1)
    # the reference's own rounding: eigenvalues that are 0 come out as +-delta, which moves log(1 + tau mu) by tau delta
    delta = len(mu) * np.finfo(float).eps * mu.max()
    for name, (_, logdet, h) in {"series": functions.at(taus)[:3], "direct": functions.direct(taus)}.items():
        bound = 1e-12 * np.abs(ref_logdet) + 1e-11 + len(mu) * taus * delta
        assert np.all(np.abs(logdet - ref_logdet) <= bound), (name, np.abs(logdet - ref_logdet) / bound)
        np.testing.assert_allclose(h[:, 0], ref_h[:, 0], rtol=1e-12, atol=len(mu) * delta, err_msg=name)
        np.testing.assert_allclose(h[:, 1:], ref_h[:, 1:], rtol=1e-12, err_msg=name)


def test_fit_null_threads(sparse_adata, reference):
    """Every thread count gives the same bits (the eigendecomposition on one thread beside a pass on the others)."""
    for n_threads in (1, 2, 4):
        result = _fit(sparse_adata.copy(), n_threads=n_threads)
        for key in KEYS:
            np.testing.assert_array_equal(result[key], reference[key], err_msg=f"n_threads={n_threads}: {key}")


def test_fit_null_threads_many_genes(monkeypatch):
    """Enough genes for several chunks per thread: the chunks (whose GEMMs' bits can depend on their size) and the
    REML's shared parts are the same whatever the thread count, so the results are bit-identical."""
    from scverse_nullfit._core import _reml

    monkeypatch.setattr(_reml, "machine_cores", lambda: 2)
    adata = snf.datasets.simulate(n_donors=60, cells_per_donor=6.0, n_genes=600, seed=5)
    reference = _fit(adata.copy(), n_threads=1)
    for n_threads in (2, 3):
        result = _fit(adata.copy(), n_threads=n_threads)
        for key in KEYS:
            np.testing.assert_array_equal(result[key], reference[key], err_msg=f"n_threads={n_threads}: {key}")


def test_iter_chunks_cover_backed(h5ad_files):
    """Backed chunks tile the matrix exactly, whatever the chunk size, with and without prefetching."""
    a = ad.read_h5ad(h5ad_files["csr"], backed="r")
    try:
        full = sparse.csr_matrix(a.X.to_memory())
        for block, prefetch, reuse in [(1, True, False), (50, False, True), (37, True, True), (10**9, True, True)]:
            rows = []
            for chunk in _read.iter_chunks(a.X, block_elements=block, prefetch=prefetch, reuse_buffers=reuse):
                assert chunk.kind == "csr"
                # reused buffers are overwritten two chunks later: keep copies
                rows.append(sparse.csr_matrix((chunk.data.copy(), chunk.indices.copy(), chunk.indptr.copy()),
                                              shape=(chunk.stop - chunk.start, full.shape[1])))  # fmt: skip
            assert (sparse.vstack(rows) != full).nnz == 0
    finally:
        a.file.close()
    with pytest.raises(ValueError, match="block_elements"):
        next(_read.iter_chunks(np.zeros((3, 3)), block_elements=0))


@pytest.mark.parametrize("kind", ["csr_matrix", "csr_array", "unsorted"])
def test_column_reader_batches(kind):
    """The column reader gives the same CSC batches as a column selection: batches in order with gaps between them,
    a batch out of order, one column, a batch with gaps inside, float32 values; a small first buffer that must grow;
    an unsorted CSR matrix through the column selection."""
    rng = np.random.default_rng(3)
    Y = sparse.random(300, 90, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    Y.data = np.round(Y.data * 10)
    if kind == "csr_array":
        Y = sparse.csr_array(Y)
    if kind == "unsorted":
        Y = Y.copy()
        Y.indices[: Y.indptr[1]] = Y.indices[: Y.indptr[1]][::-1]
        Y.has_sorted_indices = False
    reader = _read.ColumnReader(Y)
    batches = [np.arange(0, 5), np.arange(7, 30, 2), np.array([30]), np.arange(40, 90), np.arange(3, 45), [89]]
    for batch in batches:
        got = reader(np.asarray(batch))
        want = sparse.csc_matrix(Y[:, np.asarray(batch)])
        want.sort_indices()
        assert got.format == "csc" and got.dtype == np.float32 and got.has_sorted_indices
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)


# ----------------------------------------------------------------------------------------------------------------
# dask.distributed
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
        client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_local_cluster_fit_null(sparse_adata, reference, client):
    """fit_null on dask-backed X under a 2-worker LocalCluster: partial statistics on the workers, same fit."""
    import dask.array as da

    a = sparse_adata.copy()
    a.X = da.from_array(sparse.csr_matrix(np.asarray(a.X)), chunks=(29, -1))
    _assert_same(_fit(a), reference, "LocalCluster")


def test_local_cluster_gene_chunks(sparse_adata, pieces, client):
    """Gene chunks fitted on the workers give the same fits as in process."""
    import dask.array as da

    from scverse_nullfit._core._dask import dask_sufficient_stats

    local = _gene_fits(sparse_adata, pieces, n_threads=1, rotation=False)
    remote = _gene_fits(sparse_adata, pieces, chunk_size=4, rotation=True, distributed=True)
    _assert_same_fits(remote, local, "distributed gene chunks")

    donors, design, _ = pieces
    X = np.asarray(sparse_adata.X)
    stats = dask_sufficient_stats(da.from_array(X, chunks=(17, -1)), np.arange(X.shape[1]), donors, design.X)
    S, _, _, M2 = _naive_stats(X, np.arange(X.shape[1]), donors, design.X)
    np.testing.assert_allclose(stats.S, S, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(stats.M2, M2, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# exactness of the restricted-basis REML at the edges, against a dense cells x cells REML
# ----------------------------------------------------------------------------------------------------------------


def test_rank_deficient_grm_and_strong_donor_effect(dense_reml):
    """A GRM of rank < donors (few variants) and genes with h2 near 1: still the dense REML's optimum."""
    rng = np.random.default_rng(5)
    n, per = 30, 6
    geno = rng.binomial(2, 0.3, size=(n, 8)).astype(float)
    geno = (geno - geno.mean(0)) / np.maximum(geno.std(0), 1e-9)
    grm = geno @ geno.T / geno.shape[1]
    ids = [f"d{i}" for i in range(n)]
    codes = np.repeat(np.arange(n), per)
    obs = pd.DataFrame(
        {"donor_id": pd.Categorical(np.array(ids)[codes]), "x": rng.normal(size=n * per)},
        index=[f"c{i}" for i in range(n * per)],
    )
    L = np.linalg.cholesky(grm + 1e-9 * np.eye(n))
    Y = np.column_stack(
        [(L @ rng.normal(size=n))[codes] * scale + rng.normal(size=n * per) for scale in (0.0, 1.0, 10.0, 100.0)]
    )
    adata = ad.AnnData(X=Y, obs=obs)
    grm_df = pd.DataFrame(grm, index=ids, columns=ids)
    adata.uns["grm"] = grm_df
    snf.tl.fit_null(adata, covariates=["x"])
    res = adata.varm["nullfit"]
    oracle = dense_reml.from_adata(adata, ["x"])
    for j in range(Y.shape[1]):
        at = oracle.at(Y[:, j], float(res["tau"].iloc[j]))
        np.testing.assert_allclose(res["loglik"].iloc[j], at["loglik"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(res["sigma2_e"].iloc[j], at["sigma2_e"], rtol=1e-9)
        np.testing.assert_allclose(adata.varm["nullfit_beta"][j], at["beta"], rtol=1e-7, atol=1e-9)
        # no better tau nearby (the search found the maximum)
        for factor in (0.99, 1.01):
            nearby = oracle.at(Y[:, j], float(res["tau"].iloc[j]) * factor)["loglik"]
            assert nearby <= res["loglik"].iloc[j] + 1e-9
    assert res["h2"].iloc[3] > 0.9
