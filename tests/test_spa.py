"""Saddlepoint p-values of count score tests: f = Z'PZg against a dense cell-level working P, the compiled
saddlepoint against a direct numerical one (scipy root finding on the same cumulant generating function)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from scverse_nullfit._core import _glmm
from scverse_nullfit._core._step2 import CountNull, normal_pvalues

from .test_glmm import data  # noqa: F401  (the fixture)


def _dense(y, X, off, codes, G, fit, j, family):
    """Cell-level working quantities at the fit of gene j: Z, W and P."""
    n = G.shape[0]
    Z = np.zeros((len(y), n))
    Z[np.arange(len(y)), codes] = 1.0
    mu = np.exp(off + X @ fit.beta[j] + Z @ fit.u[j])
    W = mu if family == "poisson" else mu * fit.theta[j] / (mu + fit.theta[j])
    Si = np.linalg.inv(np.diag(1.0 / W) + fit.sigma2_g[j] * Z @ G @ Z.T)
    P = Si - Si @ X @ np.linalg.solve(X.T @ Si @ X, X.T @ Si)
    return Z, W, P


def _model(data, family, grm, cutoff, genes=("nb_a", "pois_low")):  # noqa: F811
    G = {"identity": np.eye(40), "dense": data["G"], "blocks": _glmm.sparsify_grm(data["G"], 0.2)}[grm]
    Y = data["cells"][list(genes)].to_numpy()
    blocks = _glmm.donor_blocks(None if grm == "identity" else G, 40)
    fit = _glmm.fit_counts(Y, data["codes"], data["X"], family=family, offset=data["off"], G=blocks)
    proj = _glmm.count_projection(
        _glmm.working_sums(Y, data["codes"], data["X"], data["off"], fit, family), fit.sigma2_g, blocks
    )
    model = CountNull(
        var_index=np.arange(len(genes)), donors=pd.Index([f"d{i}" for i in range(40)]),
        counts=np.bincount(data["codes"], minlength=40).astype(float), centre=False, sigma2_g=proj.sigma2_g,
        Dw=proj.Dw, B=proj.B, Ainv=proj.Ainv, resid=proj.resid, blocks=blocks,
        theta=fit.theta if family == "negative_binomial" else None, spa_cutoff=cutoff,
    )  # fmt: skip
    return model, fit, Y, G


def _genotypes(n_var=30, seed=5):
    rng = np.random.default_rng(seed)
    g = rng.binomial(2, rng.uniform(0.02, 0.3, n_var), (40, n_var)).astype(float)
    g[0, g.sum(axis=0) == 0] = 1.0
    return g


def _direct_spa(S, var, f, Dw, n_cells, theta):
    """The documented CGF, written out with numpy, K'(t) = s solved by brentq, Barndorff-Nielsen's r*."""
    gs = np.where(Dw > 0, f / Dw, 0.0)
    vg = max(var - np.sum(gs * f), 0.0)
    nb = np.isfinite(theta)
    w = Dw / n_cells
    a = 1 - w / theta if nb else np.ones_like(Dw)
    r = w / (theta - w) if nb else np.zeros_like(Dw)

    def K(t):
        s = t * gs
        if nb:
            return 0.5 * vg * t * t + np.sum(-n_cells * theta * np.log(1 + r - r * np.exp(a * s)) - Dw * s)
        return 0.5 * vg * t * t + np.sum(Dw * (np.exp(s) - 1 - s))

    def K1(t):
        s = t * gs
        if nb:
            e = np.exp(a * s)
            return vg * t + np.sum(gs * Dw * (e / (1 + r - r * e) - 1))
        return vg * t + np.sum(gs * Dw * (np.exp(s) - 1))

    lim = np.log(theta / w) / a if nb else np.full_like(Dw, 700.0)
    with np.errstate(divide="ignore"):
        thi = np.min(np.where(gs > 0, lim / gs, np.inf))
        tlo = np.max(np.where(gs < 0, lim / gs, -np.inf))

    def tail(q):
        hi = min(thi * (1 - 1e-12), 50 / np.sqrt(var)) if q > 0 else 0.0
        lo = 0.0 if q > 0 else max(tlo * (1 - 1e-12), -50 / np.sqrt(var))
        t = optimize.brentq(lambda x: K1(x) - q, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500)
        h = 1e-6 * abs(t)
        k2 = (K1(t + h) - K1(t - h)) / (2 * h)
        wv = np.sign(t) * np.sqrt(2 * (t * q - K(t)))
        u = t * np.sqrt(k2)
        rstar = wv + np.log(u / wv) / wv
        return stats.norm.sf(rstar) if q > 0 else stats.norm.cdf(rstar)

    return tail(abs(S)) + tail(-abs(S))


@pytest.mark.parametrize(
    ("family", "grm"), [("poisson", "identity"), ("negative_binomial", "identity"), ("negative_binomial", "blocks")]
)
def test_projected_genotypes_match_dense_P(data, family, grm):  # noqa: F811
    model, fit, Y, G = _model(data, family, grm, cutoff=2.0)
    geno = _genotypes()
    _, Var = model.stats(geno)
    for j in range(model.n_genes):
        Z, _, P = _dense(Y[:, j].astype(float), data["X"], data["off"], data["codes"], G, fit, j, family)
        cols = np.arange(geno.shape[1])
        F = model.projected(geno, np.full(len(cols), j), cols)
        np.testing.assert_allclose(F, (Z.T @ P @ Z @ geno).T, rtol=1e-8, atol=1e-9 * np.abs(F).max())
        np.testing.assert_allclose(np.einsum("vd,dv->v", F, geno), Var[j], rtol=1e-9)


@pytest.mark.parametrize(
    ("family", "grm"), [("poisson", "identity"), ("negative_binomial", "identity"), ("negative_binomial", "blocks")]
)
def test_spa_matches_direct_saddlepoint(data, family, grm):  # noqa: F811
    model, fit, _, _ = _model(data, family, grm, cutoff=0.5)
    geno = _genotypes()
    S, Var = model.stats(geno)
    pval = model.pvalues(geno, S, Var)
    normal = normal_pvalues(S, Var)
    z = np.abs(S) / np.sqrt(Var)
    below = z <= 0.5
    np.testing.assert_array_equal(pval[below], normal[below])
    theta = fit.theta if family == "negative_binomial" else np.full(model.n_genes, np.inf)
    checked = 0
    for j, v in zip(*np.nonzero(~below), strict=True):
        f = model.projected(geno, np.array([j]), np.array([v]))[0]
        ref = _direct_spa(S[j, v], Var[j, v], f, model.Dw[j], model.counts, theta[j])
        np.testing.assert_allclose(pval[j, v], ref, rtol=1e-6)
        checked += 1
    assert checked > 10
    # the saddlepoint moves the p-values above the cutoff, and without a cutoff nothing changes
    assert (pval[~below] != normal[~below]).all()
    model.spa_cutoff = None
    np.testing.assert_array_equal(model.pvalues(geno, S, Var), normal)


def test_spa_equals_normal_below_cutoff(data):  # noqa: F811
    model, _, _, _ = _model(data, "negative_binomial", "identity", cutoff=2.0)
    geno = _genotypes(60, seed=9)
    S, Var = model.stats(geno)
    pval, normal = model.pvalues(geno, S, Var), normal_pvalues(S, Var)
    small = np.abs(S) / np.sqrt(Var) <= 2.0
    assert small.any() and (~small).any()
    np.testing.assert_array_equal(pval[small], normal[small])
    assert (pval[~small] != normal[~small]).all()


@pytest.mark.parametrize(("family", "grm"), [("poisson", "identity"), ("negative_binomial", "blocks")])
def test_conditional_count_model_matches_dense_P(data, family, grm):  # noqa: F811
    """Conditioning variants as covariates of the working model at the fixed null fit: score, variance and
    f = Z'P_c Zg against a dense cell-level working P with ZC among the covariates."""
    from scverse_nullfit._core._conditional import condition

    model, fit, Y, G = _model(data, family, grm, cutoff=2.0)
    geno = _genotypes(12, seed=11)
    C, test = geno[:, :2], geno[:, 2:]
    cond, ok = condition(model, C)
    assert ok.all()
    S, Var = cond.stats(test)
    for j in range(model.n_genes):
        Z, W, _ = _dense(Y[:, j].astype(float), data["X"], data["off"], data["codes"], G, fit, j, family)
        Xc = np.column_stack([data["X"], Z @ C])
        Si = np.linalg.inv(np.diag(1.0 / W) + fit.sigma2_g[j] * Z @ G @ Z.T)
        Pc = Si - Si @ Xc @ np.linalg.solve(Xc.T @ Si @ Xc, Xc.T @ Si)
        mu = np.exp(data["off"] + data["X"] @ fit.beta[j] + Z @ fit.u[j])
        ytil = np.log(mu) - data["off"] + (Y[:, j] - mu) / mu
        gc = Z @ test
        np.testing.assert_allclose(S[j], gc.T @ Pc @ ytil, rtol=1e-8, atol=1e-9 * np.abs(S[j]).max())
        np.testing.assert_allclose(Var[j], np.einsum("cm,cd,dm->m", gc, Pc, gc), rtol=1e-8)
        cols = np.arange(test.shape[1])
        F = cond.projected(test, np.full(len(cols), j), cols)
        np.testing.assert_allclose(F, (Z.T @ Pc @ gc).T, rtol=1e-7, atol=1e-9 * np.abs(F).max())
    # a conditioning variant tested again has no signal left
    S2, Var2 = cond.stats(C)
    assert np.isnan(Var2).all() or (np.abs(S2) < 1e-6 * np.sqrt(np.abs(Var2) + 1)).all()
