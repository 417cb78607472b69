"""`fit_null`: input storage, gene subsets, layers, storage and round trips, and data oddities."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scverse_nullfit as snf

from .conftest import ARRAY_TYPES, COVARIATES, DONOR_COVARIATES

COLUMNS = ["tau", "sigma2_g", "sigma2_e", "h2", "loglik", "converged", "n_iter", "h2_pval", "tau_se", "loglik_null"]
NUMERIC = ["tau", "sigma2_g", "sigma2_e", "h2", "loglik", "h2_pval", "tau_se", "loglik_null"]
ARRAYS = ["beta", "xhx_inv", "resid_rot"]


def _fit(adata, **kwargs):
    kwargs.setdefault("covariates", COVARIATES)
    kwargs.setdefault("donor_covariates", DONOR_COVARIATES)
    out = adata.copy()
    snf.tl.fit_null(out, **kwargs)
    return out


@pytest.fixture(scope="module")
def reference(small_adata):
    """The fit of the float32 dense simulator output, the reference for everything else here."""
    return _fit(small_adata)


def _assert_same_fit(res, ref, *, rtol=1e-8, key="nullfit", ref_key="nullfit", columns=NUMERIC, genes=None):
    """Per-gene results of two fits agree (tau near 0 compared absolutely)."""
    a, b = res.varm[key], ref.varm[ref_key]
    if genes is not None:
        a, b = a.loc[genes], b.loc[genes]
    pd.testing.assert_index_equal(a.index, b.index)
    np.testing.assert_array_equal(a["converged"], b["converged"])
    for col in columns:
        atol = 1e-10 if col in ("tau", "sigma2_g", "h2") else 0
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if col == "h2_pval":
            # at tau = 0 the p-value is 1 (checked exactly, once, in test_boundary_h2_pval_is_one)
            boundary = b["tau"].to_numpy() == 0
            assert (x[boundary] >= 0.49).all() and (y[boundary] >= 0.49).all(), col
            # tiny p-values amplify loglik rounding: compare log p (absolute 1e-6 = 5e-7 in loglik)
            np.testing.assert_allclose(np.log(x[~boundary]), np.log(y[~boundary]), rtol=0, atol=1e-6, err_msg=col)
            continue
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=col)
    rows_a = slice(None) if genes is None else res.var_names.get_indexer(genes)
    rows_b = slice(None) if genes is None else ref.var_names.get_indexer(genes)
    for name in ("beta", "xhx_inv"):
        x, y = res.varm[f"{key}_{name}"][rows_a], ref.varm[f"{ref_key}_{name}"][rows_b]
        np.testing.assert_allclose(x, y, rtol=max(rtol, 1e-7), atol=1e-9, err_msg=name)
    # the rotated residuals depend on the eigenvectors' signs and order: compare them back in donor space
    np.testing.assert_allclose(
        _donor_residuals(res, key)[rows_a],
        _donor_residuals(ref, ref_key)[rows_b],
        rtol=max(rtol, 1e-7),
        atol=1e-8,
        err_msg="resid_rot",
    )


def _donor_residuals(adata, key="nullfit") -> np.ndarray:
    """U @ resid_rot = D^-1/2 Z'(y - X beta), genes x donors in sorted donor-ID order."""
    shared = adata.uns[key]
    donor_space = adata.varm[f"{key}_resid_rot"] @ shared["eigenvectors"].T
    order = np.argsort(np.asarray(shared["donors"], dtype=str))
    return donor_space[:, order]


# ----------------------------------------------------------------------------------------------------------------
# output layout
# ----------------------------------------------------------------------------------------------------------------


def test_output_layout(reference):
    res = reference.varm["nullfit"]
    assert isinstance(res, pd.DataFrame)
    assert list(res.columns[: len(COLUMNS)]) == COLUMNS
    pd.testing.assert_index_equal(res.index, reference.var_names)
    assert res["converged"].dtype == bool and res["converged"].all()
    assert (res["tau"] >= 0).all() and ((res["h2"] >= 0) & (res["h2"] < 1)).all()
    np.testing.assert_allclose(res["sigma2_g"], res["tau"] * res["sigma2_e"], rtol=1e-12)
    assert ((res["h2_pval"] > 0) & (res["h2_pval"] <= 1)).all()
    assert (res["loglik"] >= res["loglik_null"] - 1e-9).all()
    shared = reference.uns["nullfit"]
    n, p, G = len(shared["donors"]), len(shared["covariate_names"]), reference.n_vars
    assert reference.varm["nullfit_beta"].shape == (G, p)
    assert reference.varm["nullfit_xhx_inv"].shape == (G, p * (p + 1) // 2)  # packed upper triangles
    assert reference.varm["nullfit_resid_rot"].shape == (G, n)
    assert shared["eigenvectors"].shape == (n, n) and shared["eigenvalues"].shape == (n,)
    assert shared["covariates_rotated"].shape == (n, p)
    assert shared["cells_per_donor"].sum() == shared["n_cells"] == reference.n_obs
    assert shared["params"]["covariates"] == COVARIATES
    pd.testing.assert_frame_equal(snf.get.nullfit_df(reference), res, check_like=True)


def test_copy_returns_fitted_copy_and_leaves_input(small_adata, reference):
    adata = small_adata.copy()
    before_uns, before_varm = sorted(adata.uns.keys()), sorted(adata.varm.keys())
    out = snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, copy=True)
    assert out is not adata
    assert sorted(adata.uns.keys()) == before_uns and sorted(adata.varm.keys()) == before_varm
    np.testing.assert_array_equal(adata.X, small_adata.X)
    _assert_same_fit(out, reference, rtol=0)
    assert snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES) is None
    _assert_same_fit(adata, reference, rtol=0)


def test_n_threads(small_adata, reference):
    res = _fit(small_adata, n_threads=1)
    _assert_same_fit(res, reference, rtol=1e-10)


def test_key_added_keeps_other_fits(reference):
    adata = reference.copy()
    snf.tl.fit_null(adata, covariates=["cell_type"], key_added="other")
    assert {"nullfit", "other"} <= set(adata.uns.keys())
    assert {f"other_{n}" for n in ARRAYS} <= set(adata.varm.keys())
    _assert_same_fit(adata, reference, rtol=0)
    assert adata.varm["other_beta"].shape[1] == 4


# ----------------------------------------------------------------------------------------------------------------
# input storage
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", list(ARRAY_TYPES))
def test_storage_gives_the_same_fit(small_adata, reference, storage):
    adata = small_adata.copy()
    adata.X = ARRAY_TYPES[storage](small_adata.X)
    _assert_same_fit(_fit(adata), reference, rtol=1e-8)


@pytest.mark.parametrize("storage", ["dense_f64", "csr_f64", "csc_f64"])
def test_layer(small_adata, reference, storage):
    adata = small_adata.copy()
    adata.layers["logcounts"] = ARRAY_TYPES[storage](small_adata.X)
    adata.X = sparse.csr_matrix(adata.shape, dtype=np.float32)  # X is all zeros: the layer must be used
    res = _fit(adata, layer="logcounts")
    _assert_same_fit(res, reference, rtol=1e-8)
    assert res.uns["nullfit"]["params"]["layer"] == "logcounts"


def test_sparse_with_zero_rows_and_explicit_zeros(small_adata):
    """Sparse input with many zeros (explicit and implicit) equals the same matrix dense."""
    dense = np.asarray(small_adata.X, np.float64).copy()
    dense[np.abs(dense - dense.mean(axis=0)) < 0.5] = 0.0
    dense[10:15] = 0.0
    csr = sparse.csr_matrix(dense)
    csr.data[::7] = 0.0  # explicit zeros stored in the structure...
    dense_zeroed = csr.toarray()  # ...which are zeros of the dense matrix too
    a, b = small_adata.copy(), small_adata.copy()
    a.X, b.X = csr, dense_zeroed
    _assert_same_fit(_fit(a), _fit(b), rtol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# gene subsets
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["names", "mask", "single_name"])
def test_gene_subset(small_adata, reference, how):
    names = ["gene00005", "gene00001", "gene00006"] if how != "single_name" else ["gene00004"]
    mask = small_adata.var_names.isin(names)
    genes = {"names": names, "mask": mask, "single_name": names[0]}[how]
    res = _fit(small_adata, genes=genes)
    table = res.varm["nullfit"]
    pd.testing.assert_index_equal(table.index, small_adata.var_names)
    _assert_same_fit(res, reference, rtol=1e-10, genes=list(small_adata.var_names[mask]))
    others = table[~mask]
    assert not others["converged"].any()
    assert others[NUMERIC].isna().all().all()
    for name in ARRAYS:
        assert np.isnan(res.varm[f"nullfit_{name}"][~mask]).all()
    assert res.uns["nullfit"]["params"]["n_genes_fitted"] == mask.sum()


# ----------------------------------------------------------------------------------------------------------------
# h5ad round trip
# ----------------------------------------------------------------------------------------------------------------


def _assert_nested_equal(a, b, path="uns"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_names=False)
    elif isinstance(a, np.ndarray | list | tuple) and not isinstance(a, str):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, path
        if a.dtype.kind in "fc":
            np.testing.assert_array_equal(a, b, err_msg=path)
        else:
            assert [str(x) for x in a.ravel()] == [str(x) for x in b.ravel()], path
    elif a is None:
        assert b is None, path
    else:
        assert a == b, path


def test_h5ad_round_trip(reference, tmp_path):
    path = tmp_path / "fit.h5ad"
    reference.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(back.varm["nullfit"], reference.varm["nullfit"])
    assert back.varm["nullfit"]["converged"].dtype == bool
    for name in ARRAYS:
        np.testing.assert_array_equal(back.varm[f"nullfit_{name}"], reference.varm[f"nullfit_{name}"])
    _assert_nested_equal(reference.uns["nullfit"], back.uns["nullfit"])
    # a second fit on the re-read object gives the same answer
    _assert_same_fit(_fit(back), reference, rtol=1e-12)


def test_h5ad_round_trip_of_subset_fit_with_nan(small_adata, tmp_path):
    res = _fit(small_adata, genes=["gene00002"], tau=0.3)
    res.write_h5ad(tmp_path / "subset.h5ad")
    back = ad.read_h5ad(tmp_path / "subset.h5ad")
    pd.testing.assert_frame_equal(back.varm["nullfit"], res.varm["nullfit"])
    assert back.uns["nullfit"]["params"]["tau"] == 0.3
    assert back.uns["nullfit"]["params"]["layer"] in (None, "None") or pd.isna(back.uns["nullfit"]["params"]["layer"])


def test_backed_h5ad(reference, small_adata, tmp_path):
    """A backed (on-disk) AnnData, dense and CSR."""
    for name, X in (("dense", np.asarray(small_adata.X)), ("csr", sparse.csr_matrix(small_adata.X))):
        path = tmp_path / f"{name}.h5ad"
        a = small_adata.copy()
        a.X = X
        a.write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        try:
            snf.tl.fit_null(backed, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
            _assert_same_fit(backed, reference, rtol=1e-8)
        finally:
            backed.file.close()


# ----------------------------------------------------------------------------------------------------------------
# oddities that must not spoil other genes
# ----------------------------------------------------------------------------------------------------------------


def _with_extra_genes(adata, extra: dict[str, np.ndarray], positions: list[int]):
    """Insert extra genes (name -> cell vector) at the given positions."""
    X = np.asarray(adata.X, np.float64)
    names = list(adata.var_names)
    for (name, y), pos in zip(extra.items(), positions, strict=True):
        X = np.insert(X, pos, y, axis=1)
        names.insert(pos, name)
    return ad.AnnData(X, obs=adata.obs.copy(), var=pd.DataFrame(index=names), uns={"grm": adata.uns["grm"]})


@pytest.mark.parametrize("storage", ["dense_f64", "csr_f64", "csc_f64"])
def test_zero_and_constant_genes(small_adata, reference, storage):
    n = small_adata.n_obs
    odd = _with_extra_genes(small_adata, {"zero": np.zeros(n), "const": np.full(n, 2.5)}, [3, 6])
    odd.X = ARRAY_TYPES[storage](odd.X)
    res = _fit(odd)
    table = res.varm["nullfit"]
    for gene in ("zero", "const"):
        assert not table.loc[gene, "converged"]
        assert table.loc[gene, NUMERIC].isna().all()
        j = res.var_names.get_loc(gene)
        for name in ARRAYS:
            assert np.isnan(res.varm[f"nullfit_{name}"][j]).all()
    _assert_same_fit(res, reference, rtol=1e-8, genes=list(small_adata.var_names))


def test_gene_explained_by_covariates(small_adata, reference):
    """A gene that is exactly a linear function of the covariates has nothing left to fit."""
    y = 3.0 + 0.1 * small_adata.obs["log_counts"].to_numpy() + (small_adata.obs["sex"] == "M").to_numpy(float)
    odd = _with_extra_genes(small_adata, {"explained": y}, [0])
    res = _fit(odd)
    assert not res.varm["nullfit"].loc["explained", "converged"]
    assert np.isnan(res.varm["nullfit"].loc["explained", "tau"])
    _assert_same_fit(res, reference, rtol=1e-8, genes=list(small_adata.var_names))


def test_non_finite_gene_does_not_spoil_others(small_adata, reference):
    y = np.asarray(small_adata.X[:, 0], np.float64).copy()
    y[5] = np.nan
    odd = _with_extra_genes(small_adata, {"has_nan": y}, [2])
    res = _fit(odd)
    assert not res.varm["nullfit"].loc["has_nan", "converged"]
    assert np.isnan(res.varm["nullfit"].loc["has_nan", "loglik"])
    _assert_same_fit(res, reference, rtol=1e-8, genes=list(small_adata.var_names))


def test_single_cell_donors(small_adata, dense_reml):
    """Donors with one cell (the simulator forces 3, we add more by dropping cells) fit exactly."""
    obs = small_adata.obs
    first = ~obs["donor_id"].duplicated().to_numpy()
    donors = obs["donor_id"].cat.categories
    single = set(donors[::4])
    keep = first | ~obs["donor_id"].isin(single).to_numpy()
    adata = small_adata[keep].copy()
    counts = adata.obs["donor_id"].value_counts()
    assert (counts == 1).sum() >= 10
    res = _fit(adata)
    assert res.varm["nullfit"]["converged"].all()
    oracle = dense_reml.from_adata(res, COVARIATES)
    for j in range(res.n_vars):
        ref = oracle.fit(res.X[:, j])
        np.testing.assert_allclose(res.varm["nullfit"]["loglik"].iloc[j], ref["loglik"], rtol=0, atol=1e-6)


def _boundary_gene(adata) -> np.ndarray:
    """A gene with no donor effect at all: donor means of its noise are exactly removed."""
    rng = np.random.default_rng(7)
    codes = adata.obs["donor_id"].cat.codes.to_numpy()
    e = rng.standard_normal(adata.n_obs)
    e -= (np.bincount(codes, weights=e) / np.bincount(codes))[codes]
    return 2.0 + 0.3 * adata.obs["log_counts"].to_numpy() + e


def test_true_tau_zero_reports_boundary(small_adata, reference):
    odd = _with_extra_genes(small_adata, {"no_donor_effect": _boundary_gene(small_adata)}, [0])
    res = _fit(odd)
    row = res.varm["nullfit"].loc["no_donor_effect"]
    assert row["converged"]
    assert row["tau"] == 0.0 and row["h2"] == 0.0 and row["sigma2_g"] == 0.0
    assert np.isfinite(row["loglik"]) and row["sigma2_e"] > 0
    np.testing.assert_allclose(row["loglik"], row["loglik_null"], rtol=0, atol=1e-9)
    assert row["h2_pval"] >= 0.49  # exactly 1: test_boundary_h2_pval_is_one
    _assert_same_fit(res, reference, rtol=1e-8, genes=list(small_adata.var_names))


def test_boundary_h2_pval_is_one(small_adata, reference):
    """At tau = 0 the likelihood-ratio statistic is exactly 0 and the mixture p-value is 1 (not 1/2 by rounding)."""
    at_zero = reference.varm["nullfit"]["tau"] == 0
    assert at_zero.sum() >= 2
    odd = _with_extra_genes(small_adata, {"no_donor_effect": _boundary_gene(small_adata)}, [0])
    res = _fit(odd)
    np.testing.assert_array_equal(reference.varm["nullfit"]["h2_pval"][at_zero], 1.0)
    assert res.varm["nullfit"].loc["no_donor_effect", "h2_pval"] == 1.0


def test_grm_with_tiny_negative_eigenvalues(small_adata, reference):
    grm = small_adata.uns["grm"]
    tiny = grm - 1e-9 * np.eye(len(grm))
    assert np.linalg.eigvalsh(tiny.to_numpy()).min() < 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*semi-definite.*")  # rounding-level negativity is silent
        res = _fit(small_adata, grm=tiny)
    assert res.varm["nullfit"]["converged"].all()
    assert (res.uns["nullfit"]["eigenvalues"] >= 0).all()
    _assert_same_fit(res, reference, rtol=1e-5, columns=["loglik", "sigma2_e", "loglik_null"])
    np.testing.assert_allclose(res.varm["nullfit"]["tau"], reference.varm["nullfit"]["tau"], rtol=1e-4, atol=1e-7)


def test_grm_with_clearly_negative_eigenvalue_warns(small_adata):
    grm = small_adata.uns["grm"]
    bad = grm - 0.05 * np.eye(len(grm))
    with pytest.warns(UserWarning, match="positive semi-definite"):
        res = _fit(small_adata, grm=bad)
    table = res.varm["nullfit"]
    assert table["converged"].all() and np.isfinite(table["loglik"]).all()
    assert (res.uns["nullfit"]["eigenvalues"] >= 0).all()


@pytest.mark.parametrize(
    ("extra", "value"),
    [
        ("age_copy", lambda obs: obs["age"].to_numpy()),
        ("age_rescaled", lambda obs: 2.0 * obs["age"].to_numpy() - 7.0),
        ("constant", lambda obs: np.full(len(obs), 4.2)),
        ("one_level", lambda obs: pd.Categorical(["batch1"] * len(obs))),
    ],
)
def test_collinear_covariate_dropped_with_warning(small_adata, reference, extra, value):
    adata = small_adata.copy()
    adata.obs[extra] = value(adata.obs)
    with pytest.warns(UserWarning, match=extra):
        res = _fit(adata, covariates=[*COVARIATES, extra])
    assert any(extra in str(d) for d in res.uns["nullfit"]["dropped_covariates"])
    assert list(res.uns["nullfit"]["covariate_names"]) == list(reference.uns["nullfit"]["covariate_names"])
    _assert_same_fit(res, reference, rtol=1e-7)


def test_extra_grm_donors_are_ignored(small_adata, reference):
    grm = small_adata.uns["grm"]
    extra = ["X1", "X2", "X3"]
    ids = [*grm.index, *extra]
    big = pd.DataFrame(np.eye(len(ids)) * 1.02, index=ids, columns=ids)
    big.iloc[: len(grm), : len(grm)] = grm.to_numpy()
    big.iloc[-1, 0] = big.iloc[0, -1] = 0.3  # related to a donor with cells, but has none itself
    res = _fit(small_adata, grm=big)
    assert not set(extra) & set(res.uns["nullfit"]["donors"])
    _assert_same_fit(res, reference, rtol=1e-8)


def test_grm_donor_order_does_not_matter(small_adata, reference):
    grm = small_adata.uns["grm"]
    perm = np.random.default_rng(3).permutation(len(grm))
    shuffled = grm.iloc[perm, perm]
    res = _fit(small_adata, grm=shuffled)
    _assert_same_fit(res, reference, rtol=1e-8)


def test_cell_order_does_not_matter(small_adata, reference):
    perm = np.random.default_rng(4).permutation(small_adata.n_obs)
    res = _fit(small_adata[perm].copy())
    _assert_same_fit(res, reference, rtol=1e-8)


def test_grm_from_gcta_file(small_adata, reference, tmp_path):
    snf.io.write_grm(small_adata.uns["grm"], tmp_path / "cohort")
    res = _fit(small_adata, grm=tmp_path / "cohort.grm.bin")
    # the file stores float32: the answer moves by rounding only
    _assert_same_fit(res, reference, rtol=1e-4, columns=["loglik", "sigma2_e"])
    assert str(tmp_path / "cohort.grm.bin") in res.uns["nullfit"]["params"]["grm"]


def test_string_and_integer_donor_ids(small_adata, reference):
    """Donor IDs that are integers in obs match a GRM indexed by their string form, and vice versa."""
    adata = small_adata.copy()
    codes = adata.obs["donor_id"].cat.codes.to_numpy().astype(np.int64)
    adata.obs["donor_int"] = codes + 1000
    grm = small_adata.uns["grm"].copy()
    grm.index = grm.columns = [str(i + 1000) for i in range(len(grm))]
    res = _fit(adata, donor_key="donor_int", grm=grm)
    _assert_same_fit(res, reference, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# numerical robustness: large means (cancellation), scale, float32 accumulation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1e3, 1e4])
@pytest.mark.parametrize("storage", ["dense_f64", "csr_f64", "csc_f64"])
def test_location_shift_invariance(small_adata, reference, storage, shift):
    """Adding a large constant to every gene changes only the intercept (no cancellation in second moments)."""
    adata = small_adata.copy()
    adata.X = ARRAY_TYPES[storage](np.asarray(small_adata.X, np.float64) + shift)
    res = _fit(adata)
    a, b = res.varm["nullfit"], reference.varm["nullfit"]
    np.testing.assert_allclose(a["loglik"], b["loglik"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["tau"], b["tau"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a["sigma2_e"], b["sigma2_e"], rtol=1e-6)
    beta = reference.varm["nullfit_beta"].copy()
    beta[:, 0] += shift
    np.testing.assert_allclose(res.varm["nullfit_beta"], beta, rtol=1e-9, atol=1e-6)


def test_scale_equivariance(small_adata, reference):
    """Multiplying expression by 1,000: tau unchanged, variances x 1e6, REML loglik shifted by -(N - p) log 1000."""
    adata = small_adata.copy()
    adata.X = np.asarray(small_adata.X, np.float64) * 1e3
    res = _fit(adata)
    a, b = res.varm["nullfit"], reference.varm["nullfit"]
    df = adata.n_obs - len(reference.uns["nullfit"]["covariate_names"])
    np.testing.assert_allclose(a["tau"], b["tau"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(a["sigma2_e"], 1e6 * b["sigma2_e"], rtol=1e-8)
    np.testing.assert_allclose(a["loglik"], b["loglik"] - df * np.log(1e3), rtol=1e-10)
    np.testing.assert_allclose(res.varm["nullfit_beta"], 1e3 * reference.varm["nullfit_beta"], rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("storage", ["dense_f32", "csr_f32"])
def test_float32_accumulates_in_float64(small_adata, storage):
    """Float32 input with a large mean gives the fit of the same values held in float64."""
    values = (np.asarray(small_adata.X, np.float64) + 500.0).astype(np.float32)
    a, b = small_adata.copy(), small_adata.copy()
    a.X = ARRAY_TYPES[storage](values)
    b.X = values.astype(np.float64)
    _assert_same_fit(_fit(a), _fit(b), rtol=1e-8)


def test_unused_donor_categories_are_ignored(small_adata):
    """Dropping every cell of some donors (their categories stay in obs) equals a fit on the reduced GRM."""
    gone = list(small_adata.obs["donor_id"].cat.categories[[2, 9, 30]])
    subset = small_adata[~small_adata.obs["donor_id"].isin(gone).to_numpy()].copy()
    obs = subset.obs.copy()
    obs["donor_id"] = pd.Categorical(obs["donor_id"].astype(str), categories=small_adata.obs["donor_id"].cat.categories)
    subset.obs = obs
    assert set(gone) <= set(subset.obs["donor_id"].cat.categories)
    res = _fit(subset)
    keep = [d for d in small_adata.uns["grm"].index if d not in gone]
    reduced = _fit(subset, grm=small_adata.uns["grm"].loc[keep, keep])
    assert not set(gone) & set(res.uns["nullfit"]["donors"])
    _assert_same_fit(res, reduced, rtol=1e-10)


def test_tau_se_is_nan_at_the_boundary():
    """At tau = 0 the maximum is not stationary: tau_se is NaN there (as documented), finite elsewhere."""
    adata = snf.datasets.example()
    snf.tl.fit_null(adata, covariates=["age", "sex", "cell_type", "log_counts"], donor_covariates=["age", "sex"])
    df = snf.get.nullfit_df(adata)
    boundary = df["tau"] == 0
    assert boundary.any() and (~boundary).any()
    assert df.loc[boundary, "tau_se"].isna().all()
    assert np.isfinite(df.loc[~boundary, "tau_se"]).all()


def test_full_rank_columns_by_blocks_of_rows(monkeypatch):
    """The QR of the design by blocks of rows keeps the same columns as one QR of the whole (collinear, constant,
    nearly collinear and sparse columns)."""
    from scverse_nullfit._core import _design

    rng = np.random.default_rng(3)
    n = 3000
    X = np.column_stack([np.ones(n), rng.standard_normal((n, 3)), np.zeros(n)])
    X = np.column_stack([X, X[:, 1] - X[:, 2], 2 * X[:, 3] + 1e-12 * rng.standard_normal(n), rng.random(n) < 0.01])
    whole = _design.full_rank_columns(X)
    monkeypatch.setattr(_design, "QR_BLOCK_ELEMENTS", 64)  # blocks of 16 rows
    np.testing.assert_array_equal(_design.full_rank_columns(X), whole)
    np.testing.assert_array_equal(whole, [True, True, True, True, False, False, False, True])
