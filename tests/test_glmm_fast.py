"""The grouped count kernels: (donor, design row) groups with power-series zero sums equal the cell-by-cell sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import sparse

from scverse_nullfit._core import _glmm
from scverse_nullfit._core import _glmm_kernels as K


def _design(rng, n_donors=30, per_donor=25, continuous=False):
    codes = np.sort(rng.integers(0, n_donors, n_donors * per_donor))
    N = len(codes)
    age = rng.uniform(20, 80, n_donors)[codes]
    ctype = rng.integers(0, 3, N)
    cols = [np.ones(N), (age - 50) / 20, ctype == 1, ctype == 2]
    if continuous:
        cols.append(rng.standard_normal(N))
    return codes, np.column_stack(cols).astype(float)


def _reference_sums(grp, ea, codes):
    """The six zero sums of every group, cell by cell in numpy."""
    gptr, gcell, sig = grp[0], grp[1], grp[5]
    Bg = np.exp(np.random.default_rng(0).normal(0, 1, len(gptr) - 1))
    a = ea[codes] * Bg[gcell]
    z = sig * a
    q = 1.0 / (1.0 + z)
    r = z * q
    rows = [r, r * q, r * r, r * r * q, r * q * (q - r), np.log1p(z), r * q * (q * q - 4 * r * q + r * r)]
    rows.append(r * r * q * (2 * q - r))
    return Bg, np.stack([np.add.reduceat(x, gptr[:-1]) for x in rows])


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 0.05, 0.5, 5.0, 1e3])
@pytest.mark.parametrize("offset_sd", [0.0, 0.05, 0.4, 1.5])
@pytest.mark.parametrize("full", [True, False])
def test_series_equals_cell_sums(scale, offset_sd, full):
    rng = np.random.default_rng(1)
    codes, X = _design(rng)
    off = rng.normal(np.log(2000), offset_sd, len(codes)) if offset_sd else np.zeros(len(codes))
    n = codes.max() + 1
    *_, codes_s, _, _, grp = _glmm._by_donor(sparse.csc_matrix((len(codes), 1)), codes, X, off, n)
    assert (np.diff(grp[0]) > 1).any()
    if offset_sd:
        assert (grp[10] >= 0).any()
    ea = scale * np.exp(rng.normal(0, 0.5, n)) / np.exp(grp[4]).mean()
    Bg, ref = _reference_sums(grp, ea, codes_s)
    out = np.zeros((8, len(Bg)))
    K._zero_sums(ea, Bg, full, grp, out, full)
    rows = range(8) if full else range(3)
    for k in rows:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-12, atol=1e-300, err_msg=f"row {k}")


def _singletons(Y, codes, X, off, n):
    """The kernels' layout with every cell its own group (the cell-by-cell path)."""
    N = len(codes)
    out = _glmm._by_donor(Y, codes, np.column_stack([X, np.arange(N)]), off, n)
    grp = list(out[6])
    grp[3] = np.ascontiguousarray(grp[3][:, : X.shape[1]])
    return (*out[:4], np.ascontiguousarray(out[4][:, : X.shape[1]]), out[5], tuple(grp))


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("level", [0.05, 30.0])
def test_evaluate_grouped_equals_cell_by_cell(continuous, with_offset, level):
    """Log-likelihood, gradient and Hessian of the grouped evaluation equal the singleton one; low and high
    expression (the series and the cell fallback), with and without an offset, with a continuous cell covariate."""
    rng = np.random.default_rng(2)
    codes, X = _design(rng, continuous=continuous)
    N, p = X.shape
    n = codes.max() + 1
    off = rng.normal(0.0, 0.4, N) if with_offset else np.zeros(N)
    mu = level * np.exp(off + 0.3 * rng.standard_normal(n)[codes])
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    Y = sparse.csc_matrix(y[:, None])
    blocks = _glmm.donor_blocks(None, n)
    lfact = float(sum(math.lgamma(v + 1) for v in y))
    phi = np.concatenate([[math.log(level), 0.1, -0.2, 0.3][: min(p, 4)], np.zeros(p - 4), [math.log(0.2), 1.0]])
    res = []
    for layout in (_glmm._by_donor(Y, codes, X, off, n), _singletons(Y, codes, X, off, n)):
        _, indices, data, cs, Xs, offs, grp = layout
        st = K._state(p, n, grp)
        out = []
        for boundary in (True, False):
            g, H, v = np.zeros(p + 2), np.zeros((p + 2, p + 2)), np.zeros(n)
            ll, ok = K.evaluate(
                K.NEGATIVE_BINOMIAL, indices, data, cs, offs, Xs, blocks.ptr, blocks.donors, blocks.L, blocks.loff,
                phi, boundary, v, lfact, g, H, st,
            )  # fmt: skip
            assert ok
            out.append((ll, g, H))
        res.append(out)
    for (la, ga, Ha), (lb, gb, Hb) in zip(*res, strict=True):
        np.testing.assert_allclose(la, lb, rtol=1e-13)
        np.testing.assert_allclose(ga, gb, rtol=1e-9, atol=1e-9 * np.abs(gb).max())
        np.testing.assert_allclose(Ha, Hb, rtol=1e-9, atol=1e-10 * np.abs(Hb).max())
    if not continuous:
        assert len(_glmm._by_donor(Y, codes, X, off, n)[6][0]) - 1 < N // 5


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_working_sums_grouped_equal_cells(family):
    rng = np.random.default_rng(4)
    codes, X = _design(rng)
    N = X.shape[0]
    n = codes.max() + 1
    off = rng.normal(0.0, 0.4, N)
    mu = np.exp(off + 0.5)
    Y = sparse.csc_matrix(rng.poisson(mu[:, None] * np.array([0.05, 1.0, 40.0])).astype(float))
    fits = _glmm.fit_counts(Y, codes, X, family=family, offset=off)
    assert fits.converged.all()
    sums = _glmm.working_sums(Y, codes, X, off, fits, family)
    th = fits.theta if family == "negative_binomial" else np.full(3, np.inf)
    for g in range(3):
        y = Y[:, g].toarray().ravel()
        m = np.exp(off + X @ fits.beta[g] + fits.u[g][codes])
        w = m if family == "poisson" else m * th[g] / (m + th[g])
        wr = w * (fits.u[g][codes] + (y - m) / m)
        np.testing.assert_allclose(sums["Dw"][g], np.bincount(codes, w, n), rtol=1e-12)
        np.testing.assert_allclose(sums["XWX"][g], (X * w[:, None]).T @ X, rtol=1e-12)
        np.testing.assert_allclose(sums["ZWr"][g], np.bincount(codes, wr, n), rtol=1e-9, atol=1e-9 * np.abs(wr).sum())
        np.testing.assert_allclose(sums["XWr"][g], X.T @ wr, rtol=1e-9, atol=1e-9 * np.abs(wr).sum())


def test_row_groups_and_input_untouched():
    """Groups are exactly the (donor, design row) classes, donor-major; the caller's counts are not permuted."""
    rng = np.random.default_rng(5)
    codes, X = _design(rng)
    perm = rng.permutation(len(codes))
    codes, X = codes[perm], X[perm]
    group = _glmm._row_groups(codes, X)
    key = {(c, *row) for c, row in zip(codes, map(tuple, X), strict=True)}
    assert group.max() + 1 == len(key)
    first = np.unique(group, return_index=True)[1]
    assert (np.diff(codes[first]) >= 0).all()
    for g in range(0, group.max() + 1, 7):
        rows = np.column_stack([codes, X])[group == g]
        assert (rows == rows[0]).all()
    Y = sparse.csc_matrix(rng.poisson(0.5, (len(codes), 2)).astype(float))
    before = Y.copy()
    _glmm.fit_counts(Y, codes, X, family="negative_binomial", offset=rng.normal(0, 0.3, len(codes)))
    assert (Y != before).nnz == 0 and (Y.indices == before.indices).all()


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
@pytest.mark.parametrize("related", [False, True])
def test_mode_derivatives_match_finite_differences(family, related):
    """The mode's derivatives in phi that extrapolate the inner warm starts (state row 12) are those of the mode."""
    rng = np.random.default_rng(7)
    codes, X = _design(rng, n_donors=24, per_donor=15)
    N, p = X.shape
    n = codes.max() + 1
    G = None
    if related:  # blocks of 1, 2 and 3 related donors
        G = np.eye(n)
        for a in range(0, n - 3, 6):
            G[a, a + 1] = G[a + 1, a] = 0.4
            G[a + 3, a + 4] = G[a + 4, a + 3] = G[a + 3, a + 5] = G[a + 5, a + 3] = 0.25
    off = rng.normal(0.0, 0.3, N)
    mu = 0.8 * np.exp(off + 0.5 * rng.standard_normal(n)[codes])
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    Y = sparse.csc_matrix(y[:, None])
    fam = K.POISSON if family == "poisson" else K.NEGATIVE_BINOMIAL
    blocks = _glmm.donor_blocks(G, n)
    _, indices, data, cs, Xs, offs, grp = _glmm._by_donor(Y, codes, X, off, n)
    lfact = float(sum(math.lgamma(v + 1) for v in y))
    phi = np.concatenate([[math.log(0.8), 0.1, -0.2, 0.3], [math.log(0.3), 1.0]])

    def mode(ph):
        st = K._state(p, n, grp)
        g, H, v = np.zeros(p + 2), np.zeros((p + 2, p + 2)), np.zeros(n)
        _, ok = K.evaluate(
            fam, indices, data, cs, offs, Xs, blocks.ptr, blocks.donors, blocks.L, blocks.loff, ph, False, v, lfact,
            g, H, st,
        )  # fmt: skip
        assert ok
        return v, st[12].copy()

    v0, D = mode(phi)
    h = 1e-6
    for j in range(p + 2 if fam == K.NEGATIVE_BINOMIAL else p + 1):
        ph = phi.copy()
        ph[j] += h
        fd = (mode(ph)[0] - v0) / h
        np.testing.assert_allclose(D[:, j], fd, rtol=1e-4, atol=1e-5 * np.abs(fd).max() + 1e-9, err_msg=str(j))


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("level", [0.05, 0.8, 30.0])
def test_analytic_hessian_rows_match_finite_differences(family, diagonal, level):
    """With singleton donors the Hessian rows of log(s2) and log(theta) (mode and log-determinant included) are
    analytic: they equal central differences of the analytic gradient."""
    rng = np.random.default_rng(8)
    codes, X = _design(rng, n_donors=24, per_donor=15)
    N, p = X.shape
    n = codes.max() + 1
    G = np.diag(rng.uniform(0.5, 2.0, n)) if diagonal else None
    off = rng.normal(0.0, 0.3, N)
    mu = level * np.exp(off + 0.5 * rng.standard_normal(n)[codes])
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    Y = sparse.csc_matrix(y[:, None])
    fam = K.POISSON if family == "poisson" else K.NEGATIVE_BINOMIAL
    blocks = _glmm.donor_blocks(G, n)
    _, indices, data, cs, Xs, offs, grp = _glmm._by_donor(Y, codes, X, off, n)
    phi = np.concatenate([[math.log(level), 0.1, -0.2, 0.3], [math.log(0.3), 1.0]])

    def grad_hess(ph):
        st = K._state(p, n, grp)
        g, H, v = np.zeros(p + 2), np.zeros((p + 2, p + 2)), np.zeros(n)
        _, ok = K.evaluate(
            fam, indices, data, cs, offs, Xs, blocks.ptr, blocks.donors, blocks.L, blocks.loff, ph, False, v, 0.0,
            g, H, st,
        )  # fmt: skip
        assert ok
        return g, H

    _, H = grad_hess(phi)
    k = p + 2 if fam == K.NEGATIVE_BINOMIAL else p + 1
    h = 1e-5
    for j in range(p, k):
        a, b = phi.copy(), phi.copy()
        a[j] += h
        b[j] -= h
        fd = (grad_hess(a)[0] - grad_hess(b)[0]) / (2 * h)
        np.testing.assert_allclose(H[j, :k], fd[:k], rtol=1e-6, atol=1e-7 * np.abs(fd[:k]).max(), err_msg=str(j))
        np.testing.assert_allclose(H[:k, j], H[j, :k], rtol=1e-14)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
@pytest.mark.parametrize("related", [False, True])
@pytest.mark.parametrize("level", [0.05, 0.8, 30.0])
def test_loglik_only_evaluation_equals_full(family, related, level):
    """The last Newton step's end point is evaluated for its log-likelihood only (FINAL_DEC): the same Laplace
    log-likelihood and mode as the full evaluation, interior and boundary, singleton donors and related blocks."""
    rng = np.random.default_rng(9)
    codes, X = _design(rng, n_donors=24, per_donor=15)
    N, p = X.shape
    n = codes.max() + 1
    G = None
    if related:
        G = np.eye(n)
        for a in range(0, n - 3, 6):
            G[a, a + 1] = G[a + 1, a] = 0.4
            G[a + 3, a + 4] = G[a + 4, a + 3] = G[a + 3, a + 5] = G[a + 5, a + 3] = 0.25
    off = rng.normal(0.0, 0.3, N)
    mu = level * np.exp(off + 0.5 * rng.standard_normal(n)[codes])
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    y[rng.integers(0, N)] = 70.0  # one count past the histogram
    Y = sparse.csc_matrix(y[:, None])
    fam = K.POISSON if family == "poisson" else K.NEGATIVE_BINOMIAL
    blocks = _glmm.donor_blocks(G, n)
    _, indices, data, cs, Xs, offs, grp = _glmm._by_donor(Y, codes, X, off, n)
    lfact = float(sum(math.lgamma(v + 1) for v in y))
    phi = np.concatenate([[math.log(level), 0.1, -0.2, 0.3], [math.log(0.3), 1.0]])
    for boundary in (False, True):
        out = []
        for need_grad in (True, False):
            st = K._state(p, n, grp)
            g, H, v = np.zeros(p + 2), np.zeros((p + 2, p + 2)), np.zeros(n)
            ll, ok = K._evaluate(
                fam, indices, data, cs, offs, Xs, blocks.ptr, blocks.donors, blocks.L, blocks.loff, phi, boundary,
                v, lfact, g, H, st, True, need_grad,
            )  # fmt: skip
            assert ok
            out.append((ll, v, g))
        (la, va, ga), (lb, vb, gb) = out
        assert np.isfinite(la) and np.abs(ga).max() > 0
        np.testing.assert_allclose(lb, la, rtol=1e-13)
        np.testing.assert_array_equal(vb, va)
        assert not gb.any()  # no gradient was computed


def _dense_factor(blocks):
    """The donors x donors factor L of the GRM (G = L L') from its blocks."""
    n = blocks.n_donors
    L = np.zeros((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        K._block_apply(1.0, blocks.ptr, blocks.donors, blocks.L, blocks.loff, e, L[:, j], False)
    return L


def _donor_sums(family, y, codes, eta, theta, n):
    """Donor sums of h' and of the observed weight w of every cell, in numpy."""
    mu = np.exp(eta)
    if family == K.POISSON:
        h1, w = y - mu, mu
    else:
        h1 = theta * (y - mu) / (theta + mu)
        w = (y + theta) * mu * theta / (theta + mu) ** 2
    return np.bincount(codes, h1, n), np.bincount(codes, w, n)


@pytest.mark.parametrize("family", [K.POISSON, K.NEGATIVE_BINOMIAL])
@pytest.mark.parametrize("scale", [0.05, 1.0, 20.0])
def test_inner_step_bound(family, scale):
    """The bound of _block_newton on the inner Newton decrement at a step's end holds (singleton donors and a
    related block), from starts near and far from the mode."""
    rng = np.random.default_rng(int(scale * 100) + family)
    n = 8
    G = np.eye(n)
    G[:3, :3] = 0.5 + 0.5 * np.eye(3)
    blocks = _glmm.donor_blocks(G, n)
    L = _dense_factor(blocks)
    np.testing.assert_allclose(L @ L.T, G, atol=1e-12)
    codes = np.repeat(np.arange(n), 6)
    base = np.log(scale) + rng.normal(0, 0.3, len(codes))
    y = rng.poisson(np.exp(base + 0.5 * rng.standard_normal(n)[codes])).astype(float)
    theta, s2 = 3.0, 0.7
    sigma = math.sqrt(s2)
    v = np.zeros(n)
    rems = []
    for _ in range(8):  # Newton's iteration from v = 0 to the mode: every step's bound, far from it and near it
        sh, sw = _donor_sums(family, y, codes, base + sigma * (L @ v)[codes], theta, n)
        dv = np.empty(n)
        dec, rem = K._block_newton(s2, sigma, blocks.ptr, blocks.donors, blocks.L, blocks.loff, v, sh, sw, dv)
        H = np.eye(n) + s2 * L.T @ (sw[:, None] * L)
        np.testing.assert_allclose(dv, np.linalg.solve(H, sigma * L.T @ sh - v), rtol=1e-8, atol=1e-14)
        assert dec >= 0.0
        v = v + dv
        sh, sw = _donor_sums(family, y, codes, base + sigma * (L @ v)[codes], theta, n)
        g = sigma * L.T @ sh - v
        actual = g @ np.linalg.solve(np.eye(n) + s2 * L.T @ (sw[:, None] * L), g)
        assert actual <= rem * (1 + 1e-9) + 1e-24, (actual, rem)  # + the rounding floor of g near the mode
        rems.append(rem)
    assert rems[0] > 1e-6 and rems[-1] < K.INNER_REM_TOL
