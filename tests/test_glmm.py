"""Count GLMM core against lme4/glmmTMB fixtures (tests/fixtures/glmm) and a dense Laplace reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, sparse, stats

from scverse_nullfit._core import _glmm

FIX = Path(__file__).parent / "fixtures" / "glmm"
GENES = ["pois_a", "pois_b", "pois_null", "pois_low", "rel_a", "rel_b", "nb_a", "nb_b", "nb_null"]
MODELS = {
    "poisson_identity": ("poisson", False, GENES[:6]),
    "poisson_grm": ("poisson", True, ["rel_a", "rel_b", "pois_null"]),
    "nb_identity": ("negative_binomial", False, ["nb_a", "nb_b", "nb_null", "pois_a"]),
}
RTOL = 1e-4


@pytest.fixture(scope="module")
def data():
    cells = pd.read_csv(FIX / "cells.csv")
    grm = pd.read_csv(FIX / "grm.csv", index_col=0)
    codes = pd.Categorical(cells["donor"], categories=grm.index).codes.astype(np.int64)
    X = np.column_stack([np.ones(len(cells)), cells["x1"], cells["x2"]])
    return {
        "cells": cells,
        "G": grm.to_numpy(),
        "codes": codes,
        "X": X,
        "off": cells["off"].to_numpy(),
        "oracle": pd.read_csv(FIX / "oracle.csv"),
    }


@pytest.fixture(scope="module")
def fits(data):
    out = {}
    for model, (family, related, genes) in MODELS.items():
        Y = sparse.csr_matrix(data["cells"][genes].to_numpy())
        out[model] = _glmm.fit_counts(
            Y,
            data["codes"],
            data["X"],
            family=family,
            offset=data["off"],
            G=data["G"] if related else None,
            n_donors=40,
        )
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_oracle_agreement(data, fits, model):
    family, _, genes = MODELS[model]
    fit = fits[model]
    orc = data["oracle"].set_index(["model", "gene"])
    glm = "poisson_glm" if family == "poisson" else "nb_glm"
    for i, gene in enumerate(genes):
        o = orc.loc[(model, gene)]
        assert fit.converged[i], gene
        # ours is never lower than the oracle's log-likelihood
        assert fit.loglik[i] >= o["loglik"] - 1e-7 * abs(o["loglik"]), gene
        np.testing.assert_allclose(fit.loglik[i], o["loglik"], rtol=1e-8, err_msg=gene)
        beta_o = o[["b0", "b_x1", "b_x2"]].to_numpy(dtype=float)
        np.testing.assert_allclose(fit.beta[i], beta_o, rtol=RTOL, atol=1e-5, err_msg=gene)
        if o["note"] == "boundary":
            assert fit.boundary[i] and fit.sigma2_g[i] == 0.0, gene
            assert fit.pval[i] == 1.0 and np.isnan(fit.sigma2_g_se[i])
        else:
            assert not fit.boundary[i]
            np.testing.assert_allclose(fit.sigma2_g[i], o["sigma2_g"], rtol=RTOL, err_msg=gene)
            assert fit.sigma2_g_se[i] > 0
        if family == "negative_binomial":
            np.testing.assert_allclose(fit.theta[i], o["theta"], rtol=RTOL, err_msg=gene)
        else:
            assert np.isnan(fit.theta[i])
        # the s2 = 0 fit is the GLM (R's glm / glmmTMB without random effect)
        g = orc.loc[(glm, gene)]
        np.testing.assert_allclose(fit.loglik0[i], g["loglik"], rtol=1e-9, err_msg=gene)
        lrt = max(2 * (o["loglik"] - g["loglik"]), 0.0)
        expected = 0.5 * stats.chi2.sf(lrt, 1) if lrt > 1e-8 else 1.0
        np.testing.assert_allclose(fit.pval[i], expected, rtol=1e-4, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# a dense reference of the Laplace objective (u parameterisation, scipy log-densities, n x n algebra)
# ------------------------------------------------------------------------------------------------------------


def dense_laplace(y, X, off, codes, G, beta, s2, theta, family):
    n = G.shape[0]
    Z = np.zeros((len(y), n))
    Z[np.arange(len(y)), codes] = 1.0
    Sinv = np.linalg.inv(s2 * G)
    u = np.zeros(n)

    def parts(u):
        mu = np.exp(off + X @ beta + Z @ u)
        if family == "poisson":
            ll = stats.poisson.logpmf(y, mu).sum()
            h1, w = y - mu, mu
        else:
            ll = stats.nbinom.logpmf(y, theta, theta / (theta + mu)).sum()
            h1 = theta * (y - mu) / (theta + mu)
            w = theta * mu * (y + theta) / (theta + mu) ** 2
        return ll, h1, w

    for _ in range(100):
        _, h1, w = parts(u)
        step = np.linalg.solve(Z.T @ (w[:, None] * Z) + Sinv, Z.T @ h1 - Sinv @ u)
        u = u + step
        if np.abs(step).max() < 1e-13:
            break
    ll, _, w = parts(u)
    Dw = Z.T @ w
    _, logdet = np.linalg.slogdet(np.eye(n) + s2 * G * Dw[None, :])
    return ll - 0.5 * u @ Sinv @ u - 0.5 * logdet


def _check_against_dense(y, X, off, codes, G, fit, family):
    p = X.shape[1]
    beta, s2, theta = fit.beta[0], fit.sigma2_g[0], fit.theta[0]
    ref = dense_laplace(y, X, off, codes, G, beta, s2, theta, family)
    np.testing.assert_allclose(fit.loglik[0], ref, rtol=1e-10)

    def neg(par):
        th = np.exp(par[p + 1]) if family == "negative_binomial" else None
        return -dense_laplace(y, X, off, codes, G, par[:p], np.exp(par[p]), th, family)

    x0 = np.concatenate([beta, [np.log(s2)], [np.log(theta)] if family == "negative_binomial" else []])
    res = optimize.minimize(neg, x0, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000})
    # no direction improves the dense objective beyond float noise, and its optimum is ours
    assert -res.fun <= fit.loglik[0] + 1e-8
    np.testing.assert_allclose(res.x, x0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_dense_reference_related_grm(data, family):
    gene = "rel_a" if family == "poisson" else "nb_a"
    y = data["cells"][gene].to_numpy().astype(float)
    fit = _glmm.fit_counts(y[:, None], data["codes"], data["X"], family=family, offset=data["off"], G=data["G"])
    assert fit.converged[0] and not fit.boundary[0]
    _check_against_dense(y, data["X"], data["off"], data["codes"], data["G"], fit, family)


def test_block_diagonal_grm(data):
    """A GRM sparsified at a cutoff becomes blocks; the block fit equals the fit with the same matrix as dense."""
    Gs = _glmm.sparsify_grm(data["G"], 0.2)
    blocks = _glmm.donor_blocks(Gs)
    assert blocks.kind == "block-diagonal" and blocks.sizes.max() < 40
    y = data["cells"]["rel_b"].to_numpy().astype(float)
    fit = _glmm.fit_counts(y[:, None], data["codes"], data["X"], family="negative_binomial", offset=data["off"], G=Gs)
    _check_against_dense(y, data["X"], data["off"], data["codes"], Gs, fit, "negative_binomial")


def test_identity_forms_agree(data):
    Y = data["cells"][["pois_a", "nb_b"]].to_numpy()
    a = _glmm.fit_counts(Y, data["codes"], data["X"], family="negative_binomial", offset=data["off"])
    b = _glmm.fit_counts(Y, data["codes"], data["X"], family="negative_binomial", offset=data["off"], G=np.eye(40))
    c = _glmm.fit_counts(
        sparse.csc_matrix(Y), data["codes"], data["X"], family="negative_binomial", offset=data["off"], n_threads=2
    )
    for other in (b, c):
        np.testing.assert_allclose(other.loglik, a.loglik, rtol=1e-12)
        np.testing.assert_allclose(other.beta, a.beta, rtol=1e-8)


def test_degenerate_genes_do_not_spoil_others(data):
    y = data["cells"][["pois_a"]].to_numpy()
    one = np.zeros_like(y)
    one[5] = 3
    Y = np.hstack([np.zeros_like(y), y, one])
    fit = _glmm.fit_counts(Y, data["codes"], data["X"], family="poisson", offset=data["off"])
    alone = _glmm.fit_counts(y, data["codes"], data["X"], family="poisson", offset=data["off"])
    assert fit.converged.tolist() == [False, True, False]
    assert np.isnan(fit.beta[[0, 2]]).all() and np.isnan(fit.loglik[[0, 2]]).all()
    np.testing.assert_array_equal(fit.beta[1], alone.beta[0])
    np.testing.assert_array_equal(fit.loglik[1], alone.loglik[0])


@pytest.mark.parametrize(
    ("value", "what"), [(-1.0, "negative"), (1.5, "non-integer"), (np.nan, "non-finite"), (np.inf, "non-finite")]
)
@pytest.mark.parametrize("as_sparse", [False, True])
def test_bad_counts_name_gene_and_cell(data, value, what, as_sparse):
    Y = data["cells"][["pois_a", "pois_b"]].to_numpy().astype(float)
    Y[7, 1] = value
    Y = sparse.csr_matrix(Y) if as_sparse else Y
    with pytest.raises(ValueError, match=rf"gene 'g1' has a {what} value .* in cell 'c7'"):
        _glmm.fit_counts(
            Y,
            data["codes"],
            data["X"],
            offset=data["off"],
            gene_names=["g0", "g1"],
            cell_names=[f"c{i}" for i in range(Y.shape[0])],
        )


def test_bad_offset(data):
    Y = data["cells"][["pois_a"]].to_numpy()
    off = data["off"].copy()
    off[3] = np.nan
    with pytest.raises(ValueError, match="offset is non-finite in 1 cells"):
        _glmm.fit_counts(Y, data["codes"], data["X"], offset=off)
    with pytest.raises(ValueError, match="offset has 3 values"):
        _glmm.fit_counts(Y, data["codes"], data["X"], offset=off[:3])
    with pytest.raises(ValueError, match="family must be one of"):
        _glmm.fit_counts(Y, data["codes"], data["X"], family="gaussian")


# ------------------------------------------------------------------------------------------------------------
# step 2: the compact working projection against a dense cell-level working P
# ------------------------------------------------------------------------------------------------------------


def dense_working_score(y, X, off, codes, G, beta, u, s2, theta, family, geno):
    n = G.shape[0]
    Z = np.zeros((len(y), n))
    Z[np.arange(len(y)), codes] = 1.0
    eta = off + X @ beta + Z @ u
    mu = np.exp(eta)
    W = mu if family == "poisson" else mu * theta / (mu + theta)
    ytil = eta - off + (y - mu) / mu
    Sigma = np.diag(1.0 / W) + s2 * Z @ G @ Z.T
    Si = np.linalg.inv(Sigma)
    P = Si - Si @ X @ np.linalg.solve(X.T @ Si @ X, X.T @ Si)
    gc = Z @ geno
    return gc.T @ P @ ytil, np.einsum("cm,cd,dm->m", gc, P, gc)


@pytest.mark.parametrize(
    ("family", "gene", "grm"),
    [
        ("poisson", "pois_a", "identity"),
        ("negative_binomial", "nb_a", "identity"),
        ("negative_binomial", "nb_null", "identity"),
        ("poisson", "rel_a", "dense"),
        ("negative_binomial", "rel_b", "dense"),
        ("negative_binomial", "rel_b", "blocks"),
    ],
)
def test_count_score_matches_dense_working_P(data, family, gene, grm):
    G = {"identity": np.eye(40), "dense": data["G"], "blocks": _glmm.sparsify_grm(data["G"], 0.2)}[grm]
    Y = data["cells"][[gene, "pois_b"]].to_numpy()
    blocks = _glmm.donor_blocks(None if grm == "identity" else G, 40)
    fit = _glmm.fit_counts(Y, data["codes"], data["X"], family=family, offset=data["off"], G=blocks)
    sums = _glmm.working_sums(Y, data["codes"], data["X"], data["off"], fit, family)
    proj = _glmm.count_projection(sums, fit.sigma2_g, blocks)
    rng = np.random.default_rng(1)
    geno = rng.binomial(2, 0.3, (40, 5)).astype(float)
    score, var = _glmm.count_score(proj, geno, blocks, 0)
    ref_s, ref_v = dense_working_score(
        Y[:, 0].astype(float),
        data["X"],
        data["off"],
        data["codes"],
        G,
        fit.beta[0],
        fit.u[0],
        fit.sigma2_g[0],
        fit.theta[0],
        family,
        geno,
    )
    np.testing.assert_allclose(score, ref_s, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(var, ref_v, rtol=1e-9)


def test_poisson_collapse_is_exact(data):
    """Cells sharing a donor and a design row are one group for the Poisson family: same fit, same log-likelihood."""
    rng = np.random.default_rng(3)
    cells = data["cells"]
    ctype = rng.integers(0, 3, len(cells))
    X = np.column_stack([np.ones(len(cells)), ctype == 1, ctype == 2, cells["x2"]]).astype(float)
    Y = sparse.csr_matrix(cells[["pois_a", "pois_low", "pois_null"]].to_numpy())
    kw = {"family": "poisson", "offset": data["off"], "G": data["G"]}
    a = _glmm.fit_counts(Y, data["codes"], X, **kw)
    b = _glmm.fit_counts(Y, data["codes"], X, collapse=False, **kw)
    assert _glmm._poisson_groups(Y, data["codes"], X, data["off"]) is not None
    np.testing.assert_allclose(a.loglik, b.loglik, rtol=1e-11)
    np.testing.assert_allclose(a.loglik0, b.loglik0, rtol=1e-11)
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(a.sigma2_g, b.sigma2_g, rtol=1e-6)
    np.testing.assert_allclose(a.u, b.u, rtol=1e-6, atol=1e-9)
    blocks = _glmm.donor_blocks(data["G"])
    sa = _glmm.working_sums(Y, data["codes"], X, data["off"], a, "poisson")
    geno = rng.binomial(2, 0.4, (40, 3)).astype(float)
    score, var = _glmm.count_score(_glmm.count_projection(sa, a.sigma2_g, blocks), geno, blocks, 0)
    ref_s, ref_v = dense_working_score(
        Y[:, 0].toarray().ravel().astype(float),
        X,
        data["off"],
        data["codes"],
        data["G"],
        a.beta[0],
        a.u[0],
        a.sigma2_g[0],
        None,
        "poisson",
        geno,
    )
    np.testing.assert_allclose(score, ref_s, rtol=1e-8)
    np.testing.assert_allclose(var, ref_v, rtol=1e-8)
