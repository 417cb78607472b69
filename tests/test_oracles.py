"""`fit_null` against references we did not write: statsmodels MixedLM, a dense cells x cells REML, the truth."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import scverse_nullfit as snf

from .conftest import COVARIATES

# ----------------------------------------------------------------------------------------------------------------
# statsmodels MixedLM with an identity GRM
# ----------------------------------------------------------------------------------------------------------------


def _statsmodels_fits(y, X, groups) -> list:
    """REML fits of statsmodels MixedLM: its defaults, then a tight BFGS started from them."""
    import statsmodels.api as sm

    fits = []
    attempts = [{}]
    for kwargs in attempts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                res = sm.MixedLM(y, X, groups=groups).fit(reml=True, **kwargs)
            except (np.linalg.LinAlgError, ValueError):
                continue
        if np.isfinite(res.llf):
            fits.append(res)
            if not kwargs:
                attempts.append({"method": ["bfgs"], "gtol": 1e-12, "maxiter": 500, "start_params": res.params_object})
    return fits


@pytest.fixture(scope="module")
def identity_fit():
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=10, seed=3)
    ids = adata.obs["donor_id"].cat.categories
    identity = pd.DataFrame(np.eye(len(ids)), index=ids, columns=ids)
    snf.tl.fit_null(adata, covariates=COVARIATES, grm=identity)
    return adata


def test_statsmodels_identity_grm(identity_fit, design):
    pytest.importorskip("statsmodels")
    adata = identity_fit
    res = adata.varm["nullfit"]
    X, names = design(adata.obs, COVARIATES)
    assert list(adata.uns["nullfit"]["covariate_names"]) == names
    groups = adata.obs["donor_id"].astype(str).to_numpy()
    n_components = 0
    for j in range(adata.n_vars):
        fits = _statsmodels_fits(np.asarray(adata.X[:, j], np.float64), X, groups)
        assert fits, adata.var_names[j]
        ours = res.iloc[j]
        # a REML maximum is at least the REML log-likelihood of any parameter statsmodels reports
        for sm_fit in fits:
            assert ours["loglik"] >= sm_fit.llf - 1e-6, (adata.var_names[j], ours["loglik"], sm_fit.llf)
        sm_fit = max(fits, key=lambda f: f.llf)
        sm_s2g = float(np.asarray(sm_fit.cov_re)[0, 0])
        if abs(ours["loglik"] - sm_fit.llf) < 1e-7 and ours["tau"] > 1e-3:  # both at the same interior optimum
            n_components += 1
            np.testing.assert_allclose(ours["sigma2_e"], sm_fit.scale, rtol=1e-3)
            np.testing.assert_allclose(ours["sigma2_g"], sm_s2g, rtol=1e-3)
            np.testing.assert_allclose(adata.varm["nullfit_beta"][j], sm_fit.fe_params, rtol=1e-3, atol=1e-4)
    assert n_components >= 5


# ----------------------------------------------------------------------------------------------------------------
# dense N x N REML with the simulator's related GRM
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def related():
    """About 300 cells from 40 related donors (3 with one cell), 8 genes, fitted."""
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=8, seed=1)
    snf.tl.fit_null(adata, covariates=COVARIATES)
    return adata


def test_dense_reml_estimates(related, dense_reml):
    adata = related
    res = adata.varm["nullfit"]
    oracle = dense_reml.from_adata(adata, COVARIATES)
    assert oracle.N == adata.n_obs > 250
    n_interior = 0
    for j in range(adata.n_vars):
        ref = oracle.fit(adata.X[:, j])
        ours = res.iloc[j]
        assert ours["converged"]
        np.testing.assert_allclose(ours["loglik"], ref["loglik"], rtol=0, atol=1e-6)
        assert ours["loglik"] >= ref["loglik"] - 1e-8
        if ref["tau"] == 0:
            assert ours["tau"] < 1e-6
        else:
            n_interior += 1
            np.testing.assert_allclose(ours["tau"], ref["tau"], rtol=1e-4)
            np.testing.assert_allclose(ours["sigma2_g"], ref["sigma2_g"], rtol=1e-4)
            # tau_se from the observed information: central second difference of the dense REML
            t, h = ours["tau"], 1e-3 * ours["tau"]
            lls = [oracle.at(adata.X[:, j], t + k * h)["loglik"] for k in (-1, 0, 1)]
            d2 = (lls[0] - 2 * lls[1] + lls[2]) / h**2
            np.testing.assert_allclose(ours["tau_se"], np.sqrt(-1 / d2), rtol=1e-4)
        np.testing.assert_allclose(ours["sigma2_e"], ref["sigma2_e"], rtol=1e-6)
        np.testing.assert_allclose(ours["h2"], ours["tau"] / (1 + ours["tau"]), rtol=1e-12)
        np.testing.assert_allclose(adata.varm["nullfit_beta"][j], ref["beta"], rtol=1e-5, atol=1e-6)
        # the null log-likelihood is the dense REML at tau = 0
        np.testing.assert_allclose(ours["loglik_null"], oracle.at(adata.X[:, j], 0.0)["loglik"], rtol=0, atol=1e-6)
    assert n_interior >= 4


def test_dense_reml_compact_projection(related, dense_reml):
    """The stored C = (X'H^-1 X)^-1 (at unit s2e) and the rotated residuals match the dense computation."""
    adata = related
    oracle = dense_reml.from_adata(adata, COVARIATES)
    shared = adata.uns["nullfit"]
    U, codes = shared["eigenvectors"], pd.Index(shared["donors"]).get_indexer(adata.obs["donor_id"].astype(str))
    counts = np.bincount(codes, minlength=len(shared["donors"]))
    np.testing.assert_array_equal(counts, shared["cells_per_donor"])
    for j in (1, 4):
        tau = adata.varm["nullfit"]["tau"].iloc[j]
        H = np.eye(oracle.N) + tau * oracle.K
        C = np.linalg.inv(oracle.X.T @ np.linalg.solve(H, oracle.X))
        stored = adata.varm["nullfit_xhx_inv"][j]  # upper triangle, row by row
        np.testing.assert_allclose(stored, C[np.triu_indices(len(C))], rtol=1e-6, atol=1e-10)
        r = np.asarray(adata.X[:, j], np.float64) - oracle.X @ adata.varm["nullfit_beta"][j]
        rot = U.T @ (np.bincount(codes, weights=r) / np.sqrt(counts))
        np.testing.assert_allclose(adata.varm["nullfit_resid_rot"][j], rot, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.7, 12.0])
def test_fixed_tau_equals_dense_reml(related, dense_reml, tau):
    adata = related.copy()
    snf.tl.fit_null(adata, covariates=COVARIATES, tau=tau, key_added="fixed")
    res = adata.varm["fixed"]
    oracle = dense_reml.from_adata(adata, COVARIATES)
    np.testing.assert_array_equal(res["tau"], tau)
    assert res["converged"].all()
    assert adata.uns["fixed"]["params"]["tau"] == tau
    for j in range(adata.n_vars):
        ref = oracle.at(adata.X[:, j], tau)
        np.testing.assert_allclose(res["loglik"].iloc[j], ref["loglik"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(res["sigma2_e"].iloc[j], ref["sigma2_e"], rtol=1e-8)
        np.testing.assert_allclose(res["sigma2_g"].iloc[j], tau * ref["sigma2_e"], rtol=1e-8)
        np.testing.assert_allclose(adata.varm["fixed_beta"][j], ref["beta"], rtol=1e-7, atol=1e-9)
    # the estimated fit is at least as good as any fixed tau
    assert (related.varm["nullfit"]["loglik"].to_numpy() >= res["loglik"].to_numpy() - 1e-8).all()


def test_bulk_one_cell_per_donor(dense_reml):
    """Standard (bulk) mode: every donor has exactly one cell."""
    sc = snf.datasets.simulate(n_donors=120, cells_per_donor=3.0, n_genes=6, seed=5, h2_range=(0.4, 0.8))
    first = ~sc.obs["donor_id"].duplicated().to_numpy()
    bulk = sc[first].copy()
    assert bulk.n_obs == 120
    covariates = ["age", "sex"]
    snf.tl.fit_null(bulk, covariates=covariates, donor_covariates=covariates)
    res = bulk.varm["nullfit"]
    np.testing.assert_array_equal(bulk.uns["nullfit"]["cells_per_donor"], 1)
    oracle = dense_reml.from_adata(bulk, covariates)
    for j in range(bulk.n_vars):
        ref = oracle.fit(bulk.X[:, j])
        assert res["converged"].iloc[j]
        np.testing.assert_allclose(res["loglik"].iloc[j], ref["loglik"], rtol=0, atol=1e-6)
        if ref["tau"] > 1e-3:
            np.testing.assert_allclose(res["tau"].iloc[j], ref["tau"], rtol=1e-3)
        np.testing.assert_allclose(res["sigma2_e"].iloc[j], ref["sigma2_e"], rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# truth recovery on the simulator
# ----------------------------------------------------------------------------------------------------------------


def test_truth_recovery_h2():
    adata = snf.datasets.simulate(n_donors=100, cells_per_donor=15.0, n_genes=400, seed=0, n_cis_variants=1)
    snf.tl.fit_null(adata, covariates=COVARIATES)
    res, truth = adata.varm["nullfit"], adata.var
    assert res["converged"].all()
    assert abs(res["h2"].mean() - truth["true_h2"].mean()) < 0.02
    assert np.corrcoef(res["h2"], truth["true_h2"])[0, 1] > 0.95
    heritable = truth["true_h2"] > 0.3
    assert heritable.sum() > 100
    assert (res["h2_pval"][heritable] < 1e-4).all()
    # sigma2_e is estimated within a few percent (it is the cell-level noise, over ~1,500 cells)
    ratio = res["sigma2_e"] / truth["true_sigma2_e"]
    assert abs(np.median(ratio) - 1) < 0.02


def test_h2_pval_calibrated_under_null():
    adata = snf.datasets.simulate(
        n_donors=100, cells_per_donor=15.0, n_genes=400, seed=1, n_cis_variants=1, frac_null=1.0
    )
    assert (adata.var["true_tau"] == 0).all()
    snf.tl.fit_null(adata, covariates=COVARIATES)
    pval = adata.varm["nullfit"]["h2_pval"].to_numpy()
    assert np.isfinite(pval).all()
    assert 0.01 < (pval < 0.05).mean() < 0.10
    assert 0.35 < (pval < 0.5).mean() < 0.65
    # under the 50:50 mixture, 2p is uniform given p < 1/2
    assert stats.kstest(2 * pval[pval < 0.5], "uniform").pvalue > 1e-3
