"""fit_null with the count families: storage, step 2 from what is stored, and bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scverse_nullfit as snf
from scverse_nullfit._core import _glmm
from scverse_nullfit._core._design import align_grm, build_design, donor_labels

from .conftest import ARRAY_TYPES

COUNT_COVARIATES = ["age", "sex", "cell_type"]
DONOR_COVARIATES = ["age", "sex"]
KW = {"covariates": COUNT_COVARIATES, "donor_covariates": DONOR_COVARIATES, "layer": "counts", "offset": "log_counts"}


@pytest.fixture(scope="module")
def count_fits(small_adata):
    adata = small_adata.copy()
    for family in ("poisson", "negative_binomial"):
        snf.tl.fit_null(adata, family=family, key_added=family, **KW)
    return adata


def _core_fit(adata, family, Y=None):
    G, donors = align_grm(adata.uns["grm"], donor_labels(adata.obs, "donor_id"), "uns")
    design = build_design(adata.obs, COUNT_COVARIATES, DONOR_COVARIATES, donors)
    Y = adata.layers["counts"] if Y is None else Y
    off = adata.obs["log_counts"].to_numpy()
    blocks = _glmm.donor_blocks(G)
    fits = _glmm.fit_counts(Y, donors.codes, design.X, family=family, offset=off, G=blocks)
    proj = _glmm.count_projection(
        _glmm.working_sums(Y, donors.codes, design.X, off, fits, family), fits.sigma2_g, blocks
    )
    return fits, proj, blocks, donors


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_stored_like_the_core(count_fits, family):
    adata = count_fits
    df = snf.get.nullfit_df(adata, family)
    fits, proj, _, donors = _core_fit(adata, family)
    np.testing.assert_allclose(df["sigma2_g"], fits.sigma2_g, rtol=1e-12)
    np.testing.assert_allclose(df["loglik"], fits.loglik, rtol=1e-12)
    np.testing.assert_allclose(df["loglik_null"], fits.loglik0, rtol=1e-12)
    np.testing.assert_allclose(df["h2_pval"], fits.pval, rtol=1e-12)
    np.testing.assert_allclose(adata.varm[f"{family}_beta"], fits.beta, rtol=1e-12)
    np.testing.assert_allclose(adata.varm[f"{family}_resid_rot"], proj.resid, rtol=1e-10, atol=1e-12)
    assert df[["tau", "sigma2_e", "h2", "tau_se"]].isna().all().all()
    assert df["converged"].all()
    if family == "poisson":
        assert df["theta"].isna().all()
    else:
        assert (df["theta"] > 0).all()
    params = adata.uns[family]["params"]
    assert params["family"] == family and params["offset"] == "log_counts"
    assert list(adata.uns[family]["donors"]) == list(donors.ids)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_score_test_from_stored_fit(count_fits, family, tmp_path):
    """score_test on a re-read h5ad without the counts equals the core's working-model score."""
    path = tmp_path / "counts.h5ad"
    count_fits.write_h5ad(path)
    back = ad.read_h5ad(path)
    del back.layers["counts"]
    geno = back.uns["genotypes"].iloc[:, :12]
    res = snf.tl.score_test(back, geno, key=family)
    _, proj, blocks, donors = _core_fit(count_fits, family)
    g = geno.loc[donors.ids].to_numpy()
    for j in (0, 3):
        score, var = _glmm.count_score(proj, g, blocks, j)
        rows = res[res["gene"] == back.var_names[j]]
        np.testing.assert_allclose(rows["score_var"], var, rtol=1e-8)
        # centring the genotypes changes the score by a multiple of the (annihilated) intercept only
        np.testing.assert_allclose(rows["score"], score, rtol=1e-6, atol=1e-8 * np.abs(score).max())
    cis = snf.tl.cis_map(back, back.uns["genotypes"], variants=back.uns["variants"], key=family, key_added="cis")
    assert cis is None and snf.get.cis_genes_df(back, "cis")["n_variants"].sum() > 0


@pytest.mark.parametrize("kind", ["csr_f32", "dense_f64", "csc_f64", "dask_csr"])
def test_storage_types_agree(small_adata, count_fits, kind):
    adata = small_adata.copy()
    adata.layers["counts"] = ARRAY_TYPES[kind](adata.layers["counts"].toarray())
    snf.tl.fit_null(adata, family="negative_binomial", **KW)
    ref = snf.get.nullfit_df(count_fits, "negative_binomial")
    np.testing.assert_allclose(snf.get.nullfit_df(adata)["loglik"], ref["loglik"], rtol=1e-12)


def test_degenerate_gene_is_nan_and_warned(small_adata):
    adata = small_adata.copy()
    counts = adata.layers["counts"].toarray()
    counts[:, 2] = 0
    counts[:, 5] = 0
    counts[7, 5] = 4
    adata.layers["counts"] = sparse.csr_matrix(counts)
    snf.tl.fit_null(adata, family="poisson", **KW)
    df = snf.get.nullfit_df(adata)
    assert df["converged"].tolist() == [True, True, False, True, True, False, True, True]
    assert df.loc[df.index[[2, 5]], ["sigma2_g", "loglik"]].isna().all().all()


@pytest.mark.parametrize(
    ("change", "kwargs", "exc", "match"),
    [
        (None, {"family": "binomial"}, ValueError, "family must be one of"),
        (None, {"family": "gaussian", "offset": "log_counts", "layer": None}, ValueError, "offset is for the count"),
        (None, {"family": "poisson", "tau": 0.5}, ValueError, "tau="),
        (None, {"family": "poisson", "offset": "nope"}, KeyError, "'nope'"),
        (None, {"family": "poisson", "offset": "cell_type"}, ValueError, "must be numeric"),
        ("nan_offset", {"family": "poisson"}, ValueError, "offset column 'log_counts' is non-finite in 1 cells"),
        ("fraction", {"family": "negative_binomial"}, ValueError, r"gene 'gene00003' has a non-integer value"),
        ("negative", {"family": "poisson"}, ValueError, r"gene 'gene00001' has a negative value .* in cell"),
        ("gaussian_x", {"family": "poisson", "layer": None}, ValueError, "raw counts"),
    ],
)
def test_bad_input(small_adata, change, kwargs, exc, match):
    adata = small_adata.copy()
    if change == "nan_offset":
        adata.obs.loc[adata.obs_names[4], "log_counts"] = np.nan
    elif change in ("fraction", "negative"):
        counts = adata.layers["counts"].toarray()
        j = 3 if change == "fraction" else 1
        counts[10, j] = 1.5 if change == "fraction" else -2
        adata.layers["counts"] = sparse.csr_matrix(counts)
    before = adata.copy()
    args = {**KW, **kwargs}
    with pytest.raises(exc, match=match):
        snf.tl.fit_null(adata, **args)
    assert "nullfit" not in adata.uns and "nullfit" not in adata.varm
    pd.testing.assert_frame_equal(adata.obs, before.obs)


def test_sparsify_grm_blocks(small_adata):
    """A GRM sparsified at a relatedness cutoff makes the fit block-diagonal; blocks are stored and used."""
    adata = small_adata.copy()
    adata.uns["grm_sparse"] = snf.tl.sparsify_grm(adata.uns["grm"], 0.1)
    assert adata.uns["grm_sparse"].attrs["blocks"][0] > 1
    snf.tl.fit_null(adata, family="negative_binomial", grm="grm_sparse", **KW)
    sizes = np.diff(adata.uns["nullfit"]["grm_blocks"]["ptr"])
    assert sorted(sizes.tolist(), reverse=True) == adata.uns["grm_sparse"].attrs["blocks"]
    assert sizes.max() > 1 and len(sizes) > 5
    res = snf.tl.score_test(adata, adata.uns["genotypes"].iloc[:, :5], genes=adata.var_names[:2])
    assert np.isfinite(res["z"]).all()


def test_gene_batches_and_subsets(small_adata, count_fits, monkeypatch):
    """Genes read in several batches (CSR input: one CSC copy of the selected genes) give the same fits."""
    import scverse_nullfit.tl._fit_null as module

    monkeypatch.setattr(module, "COUNT_BATCH_NNZ", 300)
    adata = small_adata.copy()
    pick = [1, 3, 4, 6]
    snf.tl.fit_null(adata, family="negative_binomial", genes=adata.var_names[pick], **KW)
    df = snf.get.nullfit_df(adata)
    ref = snf.get.nullfit_df(count_fits, "negative_binomial")
    np.testing.assert_allclose(df["loglik"].iloc[pick], ref["loglik"].iloc[pick], rtol=1e-12)
    rest = np.setdiff1d(np.arange(adata.n_vars), pick)
    assert df["loglik"].iloc[rest].isna().all() and not df["converged"].iloc[rest].any()
    np.testing.assert_allclose(
        adata.varm["nullfit_resid_rot"][pick], count_fits.varm["negative_binomial_resid_rot"][pick], rtol=1e-10
    )


def test_batches_read_ahead_leave_blas_threads(small_adata, monkeypatch):
    """With the next batch read on a background thread, the process's BLAS thread counts are as before the fit."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import scverse_nullfit.tl._fit_null as module

    monkeypatch.setattr(module, "COUNT_BATCH_NNZ", 300)
    with threadpool_limits(limits=2, user_api="blas"):
        before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        snf.tl.fit_null(small_adata.copy(), family="negative_binomial", n_threads=2, **KW)
        after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert after == before


def test_trans_map_takes_a_count_fit(small_adata):
    import scverse_nullfit as snf

    adata = small_adata.copy()
    snf.tl.fit_null(adata, layer="counts", family="poisson", offset="log_counts", covariates=["age"])
    geno = adata.uns["genotypes"].iloc[:, :6]
    snf.tl.trans_map(adata, geno, pval_threshold=1.0)
    got = snf.get.trans_df(adata)
    want = snf.tl.score_test(adata, geno)
    assert len(got) == int(want["pval"].notna().sum())


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_count_conditional_and_spa_through_tools(count_fits, family):
    """score_test(condition=...) and cis_map(independent=True) accept count fits; spa changes only pval, and only
    where |z| > 2."""
    adata = count_fits
    geno = adata.uns["genotypes"].iloc[:, :15]
    spa = snf.tl.score_test(adata, geno, key=family)
    plain = snf.tl.score_test(adata, geno, key=family, spa=False)
    cols = ["score", "score_var", "z", "beta", "se"]
    pd.testing.assert_frame_equal(spa[cols], plain[cols])
    small = ~(np.abs(plain["z"]) > 2)
    np.testing.assert_array_equal(spa["pval"][small], plain["pval"][small])
    cond = snf.tl.score_test(adata, geno, key=family, condition=[geno.columns[0]])
    assert cond.loc[cond["variant"] == geno.columns[0], "score_var"].isna().all()
    assert np.isfinite(cond.loc[cond["variant"] != geno.columns[0], "pval"]).any()
    snf.tl.cis_map(
        adata, adata.uns["genotypes"], variants=adata.uns["variants"], key=family, key_added="cis_ind",
        independent=True, fdr=0.99,
    )  # fmt: skip
    assert "independent" in adata.uns["cis_ind"]


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_no_offset_is_offset_zero(small_adata, family):
    """Without ``offset`` the model has none: the same fit as an offset column of zeros."""
    adata = small_adata.copy()
    adata.obs["zero"] = 0.0
    kw = {k: v for k, v in KW.items() if k != "offset"}
    snf.tl.fit_null(adata, family=family, key_added="none", **kw)
    snf.tl.fit_null(adata, family=family, key_added="zero", offset="zero", **kw)
    a, b = snf.get.nullfit_df(adata, key="none"), snf.get.nullfit_df(adata, key="zero")
    assert a["converged"].all()
    pd.testing.assert_frame_equal(a, b)
    assert adata.uns["none"]["params"]["offset"] is None


def test_compile_notice_on_first_use(small_adata, monkeypatch, capsys):
    """A fit that will compile the count kernels says so (at info level) before the wait; a cached one does not."""
    import sys

    from scanpy import settings

    from scverse_nullfit._core._compiled import cached_on_disk

    assert cached_on_disk(_glmm.K.fit_genes_range)  # compiled by the fits above, or loaded from numba's cache
    adata = small_adata[:, :3].copy()
    old = settings.verbosity, settings.logfile
    settings.verbosity, settings.logfile = 2, sys.stderr
    try:
        snf.tl.fit_null(adata, family="poisson", **KW)
        assert "compiling the count kernels" not in capsys.readouterr().err
        monkeypatch.setattr(_glmm, "kernels_cached", lambda: False)
        snf.tl.fit_null(adata, family="poisson", **KW)
        assert "compiling the count kernels" in capsys.readouterr().err
    finally:
        settings.verbosity, settings.logfile = old
