"""Stored results describe the data they sit on: stale-result checks, AnnData operations on fitted objects,
provenance in ``params``, explicit execution and scanpy conventions."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf

from .conftest import COVARIATES, DONOR_COVARIATES


def _geno_adata(fitted) -> ad.AnnData:
    dosages = fitted.uns["genotypes"]
    variants = fitted.uns["variants"]
    g = ad.AnnData(X=dosages.to_numpy(dtype=np.float64), obs=pd.DataFrame(index=dosages.index.astype(str)))
    g.var_names = dosages.columns.astype(str)
    g.var["chrom"] = list(variants.loc[g.var_names, "chrom"])
    g.var["pos"] = variants.loc[g.var_names, "pos"].to_numpy(dtype=np.int64)
    return g


@pytest.fixture(scope="module")
def mapped(fitted):
    adata = fitted.copy()
    snf.tl.cis_map(adata, _geno_adata(adata))
    return adata


@pytest.fixture
def geno(fitted):
    return fitted.uns["genotypes"].iloc[:, :10].copy()


# ---------------------------------------------------------------------------------------------------------------
# cells: subset, reordered, concatenated
# ---------------------------------------------------------------------------------------------------------------


def test_cell_subset_is_refused_by_every_consumer(mapped, geno):
    sub = mapped[:150].copy()
    with pytest.raises(ValueError, match=r"cells.*150.*\d+|\d+.*cells.*150"):
        snf.tl.score_test(sub, geno)
    with pytest.raises(ValueError, match="cells"):
        snf.tl.cis_map(sub, _geno_adata(mapped))
    with pytest.raises(ValueError, match="cells"):
        snf.get.nullfit_df(sub)
    with pytest.raises(ValueError, match="cells"):
        snf.get.cis_df(sub)
    with pytest.raises(ValueError, match="cells"):
        snf.get.cis_genes_df(sub)
    with pytest.raises(ValueError, match="cells"):
        snf.pl.h2_hist(sub, show=False)


def test_reordered_cells_are_refused(mapped, geno):
    rng = np.random.default_rng(0)
    shuffled = mapped[rng.permutation(mapped.n_obs)].copy()
    with pytest.raises(ValueError, match="reordered"):
        snf.tl.score_test(shuffled, geno)


def test_changed_donor_labels_are_refused(fitted, geno):
    adata = fitted.copy()
    donors = adata.obs["donor_id"].astype(str).to_numpy().copy()
    first_other = np.flatnonzero(donors != donors[0])[0]
    donors[0], donors[first_other] = donors[first_other], donors[0]
    adata.obs["donor_id"] = pd.Categorical(donors)
    with pytest.raises(ValueError, match="donor"):
        snf.tl.score_test(adata, geno)


def test_concatenated_cells_are_refused(fitted, geno):
    both = ad.concat([fitted, fitted[:20]], axis=0, merge="first", uns_merge="first", index_unique="-")
    if "nullfit" not in both.uns or "nullfit" not in both.varm:
        pytest.skip("anndata dropped the fit on concatenation")
    with pytest.raises(ValueError, match="cells"):
        snf.tl.score_test(both, geno)


def test_gene_subset_keeps_working(mapped, geno):
    keep = mapped.var_names[[0, 2, 5]]
    sub = mapped[:, keep].copy()
    full = snf.tl.score_test(mapped, geno)
    part = snf.tl.score_test(sub, geno)
    assert list(part["gene"].cat.categories) == list(keep)
    ref = full[full["gene"].isin(keep)].reset_index(drop=True)
    np.testing.assert_allclose(part["z"].to_numpy(), ref["z"].to_numpy(), rtol=1e-12, equal_nan=True)
    assert list(snf.get.nullfit_df(sub).index) == list(keep)
    # results keyed by gene follow the gene subset
    assert set(snf.get.cis_df(sub)["gene"].astype(str)) <= set(keep)
    assert set(snf.get.cis_df(sub)["gene"].astype(str)) == set(
        snf.get.cis_df(mapped)["gene"].astype(str)[snf.get.cis_df(mapped)["gene"].isin(keep)]
    )
    assert list(snf.get.cis_genes_df(sub).index) == list(keep)
    snf.pl.qq(sub, show=False)
    snf.pl.h2_hist(sub, show=False)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_round_trip_keeps_the_fingerprint(mapped, geno, tmp_path, fmt):
    if fmt == "zarr":
        pytest.importorskip("zarr")
    path = tmp_path / f"fitted.{fmt}"
    getattr(mapped, f"write_{fmt}")(path)
    back = getattr(ad, f"read_{fmt}")(path)
    a = snf.tl.score_test(mapped, geno)
    b = snf.tl.score_test(back, geno)
    np.testing.assert_allclose(a["z"].to_numpy(), b["z"].to_numpy(), rtol=1e-12, equal_nan=True)
    snf.get.cis_df(back)


# ---------------------------------------------------------------------------------------------------------------
# derived results and refits
# ---------------------------------------------------------------------------------------------------------------


def test_cis_results_from_an_older_fit_are_refused(mapped):
    adata = mapped.copy()
    snf.get.cis_df(adata)  # current
    snf.tl.fit_null(adata, covariates=["age", "sex"], donor_covariates=["age", "sex"])  # a newer fit, same key
    with pytest.raises(ValueError, match=r"earlier fit|re-run"):
        snf.get.cis_df(adata)
    with pytest.raises(ValueError, match=r"earlier fit|re-run"):
        snf.get.cis_genes_df(adata)


def test_score_test_output_records_its_key_and_model(fitted, geno):
    out = snf.tl.score_test(fitted, geno)
    assert out.attrs["key"] == "nullfit"
    assert out.attrs["model"] == "gaussian"
    assert out.attrs["fit_id"] == fitted.uns["nullfit"]["fit_id"]


# ---------------------------------------------------------------------------------------------------------------
# storage that works with the rest of the ecosystem
# ---------------------------------------------------------------------------------------------------------------


def test_every_stored_array_is_at_most_2d(fitted):
    for name, value in fitted.varm.items():
        assert np.ndim(value) <= 2, name


def test_outer_concat_over_genes_and_transpose(fitted, geno):
    other = ad.AnnData(
        X=np.zeros((fitted.n_obs, 3)),
        obs=fitted.obs.copy(),
        var=pd.DataFrame(index=["new1", "new2", "new3"]),
    )
    both = ad.concat([fitted, other], axis=1, join="outer", merge="first", uns_merge="first")
    assert both.n_vars == fitted.n_vars + 3
    df = snf.get.nullfit_df(both)
    assert df.loc["new1"].isna()["tau"]
    assert not bool(df.loc["new1", "converged"])
    snf.pl.h2_hist(both, converged_only=True, show=False)
    out = snf.tl.score_test(both, geno)
    assert out.loc[out["gene"] == "new1", "z"].isna().all()
    np.testing.assert_allclose(
        out.loc[out["gene"] == fitted.var_names[0], "z"].to_numpy(),
        snf.tl.score_test(fitted, geno, genes=[fitted.var_names[0]])["z"].to_numpy(),
        rtol=1e-12,
    )
    fitted.T  # noqa: B018 - must not raise


def test_params_record_how_to_reproduce(fitted):
    params = fitted.uns["nullfit"]["params"]
    assert params["version"] == snf.__version__
    assert params["key_added"] == "nullfit"
    assert "genes" in params
    assert isinstance(fitted.uns["nullfit"]["fit_id"], str)


def test_params_describe_a_dataframe_grm(adata):
    grm = adata.uns["grm"].copy()
    snf.tl.fit_null(adata, grm=grm, covariates=["age"], genes=adata.var_names[:2])
    params = adata.uns["nullfit"]["params"]
    assert params["grm"] != "DataFrame"
    desc = params["grm"]
    assert str(len(grm)) in desc and "sha256" in desc
    assert list(params["genes"]) == list(adata.var_names[:2])


# ---------------------------------------------------------------------------------------------------------------
# scanpy conventions
# ---------------------------------------------------------------------------------------------------------------


def test_genes_as_a_boolean_var_column(adata):
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 2 == 0
    snf.tl.fit_null(adata, covariates=["age"], genes="highly_variable")
    df = snf.get.nullfit_df(adata)
    assert df["converged"].to_numpy().tolist() == adata.var["highly_variable"].tolist()
    assert adata.uns["nullfit"]["params"]["genes"] == "highly_variable"


def test_genes_var_column_not_boolean(adata):
    adata.var["score"] = np.arange(adata.n_vars, dtype=float)
    with pytest.raises(ValueError, match="score"):
        snf.tl.fit_null(adata, covariates=["age"], genes="score")


def test_duplicated_var_names_get_scanpy_advice(adata):
    names = list(adata.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.var_names = names
    with pytest.raises(ValueError, match="var_names_make_unique"):
        snf.tl.fit_null(adata, covariates=["age"])


def test_copy_with_backed_input_fails_up_front(adata, tmp_path):
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match="backed"):
        snf.tl.fit_null(backed, covariates=["age"], copy=True)


def test_copy_leaves_the_input_alone(adata):
    before = set(adata.varm.keys()), set(adata.uns.keys())
    out = snf.tl.fit_null(adata, covariates=["age"], copy=True)
    assert (set(adata.varm.keys()), set(adata.uns.keys())) == before
    assert "nullfit" in out.varm


def test_grossly_non_psd_grm_is_an_error(adata):
    grm = adata.uns["grm"].copy()
    vals, vecs = np.linalg.eigh(grm.to_numpy())
    vals[0] = -6.3
    bad = pd.DataFrame(vecs @ np.diag(vals) @ vecs.T, index=grm.index, columns=grm.columns)
    with pytest.raises(ValueError, match=r"-6\.3"):
        snf.tl.fit_null(adata, grm=bad, covariates=["age"])
    assert "nullfit" not in adata.uns


def test_tiny_negative_eigenvalues_are_clipped_with_a_warning(adata):
    grm = adata.uns["grm"].copy()
    vals, vecs = np.linalg.eigh(grm.to_numpy())
    vals[0] = -1e-4
    bad = pd.DataFrame(vecs @ np.diag(vals) @ vecs.T, index=grm.index, columns=grm.columns)
    with pytest.warns(UserWarning, match="negative eigenvalue"):
        snf.tl.fit_null(adata, grm=bad, covariates=["age"])


# ---------------------------------------------------------------------------------------------------------------
# explicit execution and threads
# ---------------------------------------------------------------------------------------------------------------


def test_an_existing_distributed_client_is_not_used_for_numpy_input(small_adata):
    distributed = pytest.importorskip("distributed")
    adata = small_adata.copy()
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
        tasks = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_groups))
    assert tasks == 0


def test_n_threads_default_follows_scanpy_n_jobs():
    import scanpy as sc

    from scverse_nullfit import _utils

    before = sc.settings.n_jobs
    try:
        sc.settings.n_jobs = 1  # scanpy's default: not set, use every CPU
        assert _utils.resolve_threads(None) == _utils.cpu_count()
        sc.settings.n_jobs = 3
        assert _utils.resolve_threads(None) == 3
        sc.settings.n_jobs = -1
        assert _utils.resolve_threads(None) == _utils.cpu_count()
        assert _utils.resolve_threads(1) == 1
    finally:
        sc.settings.n_jobs = before


def test_n_threads_limits_the_compiled_pass(small_adata, monkeypatch):
    """The compiled passes take their thread count from n_threads, not from the process-wide BLAS setting."""
    import scipy.sparse as sp

    adata = small_adata.copy()
    adata.X = sp.csr_matrix(adata.X)
    ref = snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, n_threads=1, copy=True)
    two = snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, n_threads=2, copy=True)
    pd.testing.assert_frame_equal(snf.get.nullfit_df(ref), snf.get.nullfit_df(two))


# ---------------------------------------------------------------------------------------------------------------
# plots on DataFrames
# ---------------------------------------------------------------------------------------------------------------


def test_lambda_gc_and_qq_take_a_score_test_dataframe(fitted, geno):
    out = snf.tl.score_test(fitted, geno)
    lam = snf.pl.lambda_gc(out)
    assert np.isfinite(lam)
    assert lam == pytest.approx(snf.pl.lambda_gc(out["pval"]))
    snf.pl.qq(out, show=False)
    adata = fitted.copy()
    adata.uns["scan"] = out
    snf.pl.qq(adata, key="scan", show=False)


def test_h2_hist_fits_the_axis_to_the_data(fitted):
    adata = fitted.copy()
    table = adata.varm["nullfit"].copy()
    table["h2"] = np.linspace(0, 0.02, adata.n_vars)
    adata.varm["nullfit"] = table
    ax = snf.pl.h2_hist(adata, show=False)
    assert ax.get_xlim()[1] < 0.5


def test_transposed_genotypes_get_a_hint(fitted, geno):
    with pytest.raises(ValueError, match="transposed"):
        snf.tl.score_test(fitted, geno.T)


def test_missing_grm_donors_show_grm_ids(adata):
    grm = adata.uns["grm"].copy()
    grm.index = grm.columns = [f"X{i}" for i in range(len(grm))]
    with pytest.raises(ValueError, match=r"GRM's donor IDs look like 'X0'"):
        snf.tl.fit_null(adata, grm=grm, covariates=["age"])


def test_truth_report_counts_eqtl_genes_as_genetic():
    from scverse_nullfit.datasets._truth import truth_report

    res = pd.DataFrame({"h2": [0.0, 0.2, 0.3], "h2_pval": [0.5, 1e-4, 1e-6]})
    lines = "\n".join(truth_report(res, np.array([0.0, 0.0, 0.3]), np.array([0.0, 0.5, 0.0])))
    assert "null genes (no genetic effect)     1:" in lines
    assert "genes with a genetic effect        2:" in lines


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_count_fits_store_2d_arrays_and_provenance(small_adata, family, tmp_path):
    adata = small_adata.copy()
    snf.tl.fit_null(adata, layer="counts", family=family, offset="log_counts", covariates=["age", "sex"])
    for name, value in adata.varm.items():
        assert np.ndim(value) <= 2, name
    shared = adata.uns["nullfit"]
    assert shared["params"]["family"] == family and shared["params"]["version"] == snf.__version__
    assert isinstance(shared["fit_id"], str) and shared["cells"]["n_cells"] == adata.n_obs
    geno = adata.uns["genotypes"].iloc[:, :5]
    out = snf.tl.score_test(adata, geno)
    assert out.attrs["model"] == family
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(snf.tl.score_test(back, geno)["z"], out["z"], rtol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="cells"):
        snf.tl.score_test(adata[:100].copy(), geno)
    cond = snf.tl.score_test(adata, geno, condition=[geno.columns[0]])  # conditional tests work on count fits
    assert cond.loc[cond["variant"] == geno.columns[0], "score_var"].isna().all()
