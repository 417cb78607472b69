"""Compiled per-gene kernels of the count GLMM (Laplace maximum likelihood); the maths is in ``docs/model.md``.

Notation: for one gene, ``eta_c = o_c + x_c'b + sigma (L v)_d(c)`` with ``v ~ N(0, I)`` and ``G = L L'`` (block by
block), ``h_c`` the log-density of cell c, ``h1 = dh/deta``, ``w = -d2h/deta2`` (the observed weight), ``w1 = dw/deta``,
and for the negative binomial ``hk, h1k, wk`` the derivatives of ``h, h1, w`` in ``kappa = log theta``. Every
per-cell quantity enters through a sum over the cells (a donor sum or a covariate cross-product), computed by one
pass over all cells that reads the gene's non-zeros with a merge walk (zeros are never stored).
"""

from __future__ import annotations

import math

import numba
import numpy as np

POISSON = 0
NEGATIVE_BINOMIAL = 1

#: log(sigma2_g) below which the donor variance counts as the boundary 0.
RHO_MIN = math.log(1e-10)
#: Bounds on log(theta); at the upper bound the negative binomial is indistinguishable from the Poisson.
KAPPA_MIN = math.log(1e-4)
KAPPA_MAX = math.log(1e6)
MAX_ITER = 200
INNER_MAX_ITER = 100
#: The outer Newton stops when the Newton decrement g'(-H)^-1 g falls below this (log-likelihood units).
DECREMENT_TOL = 1e-11
#: Relative finite-difference step of the Hessian (columns are differences of the analytic gradient).
FD_STEP = 1e-5

# status codes
OK = 0
BOUNDARY = 1
FAILED = 2


@numba.njit(cache=True, nogil=True)
def _digamma_diff(y, theta):  # pragma: no cover - compiled
    """psi(y + theta) - psi(theta) for a count y >= 0."""
    if y < 30.0:
        s = 0.0
        k = 0.0
        while k < y:
            s += 1.0 / (theta + k)
            k += 1.0
        return s
    return _digamma(y + theta) - _digamma(theta)


@numba.njit(cache=True, nogil=True)
def _digamma(x):  # pragma: no cover - compiled
    s = 0.0
    while x < 8.0:
        s -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    t = f * (-1.0 / 12 + f * (1.0 / 120 + f * (-1.0 / 252 + f * (1.0 / 240 + f * (-1.0 / 132)))))
    return s + math.log(x) - 0.5 / x + t


@numba.njit(cache=True, nogil=True)
def _nb_terms(y, eta, theta, out):  # pragma: no cover - compiled
    """out = (h without the lgamma constants, h1, w, w1, hk, h1k, wk) for the NB2 log link; returns mu."""
    mu = math.exp(eta)
    tm = theta + mu
    h = -theta * math.log1p(mu / theta)
    if y > 0.0:
        h -= y * math.log1p(theta / mu)
    out[0] = h
    out[1] = theta * (y - mu) / tm
    w = (y + theta) * theta * mu / (tm * tm)
    out[2] = w
    out[3] = w * (theta - mu) / tm
    dth = _digamma_diff(y, theta) - math.log1p(mu / theta) + (mu - y) / tm
    out[4] = theta * dth
    out[5] = theta * (y - mu) * mu / (tm * tm)
    out[6] = theta * mu * (y * mu - y * theta + 2.0 * theta * mu) / (tm * tm * tm)
    return mu


@numba.njit(cache=True, nogil=True)
def _base(off, X, beta, out):  # pragma: no cover - compiled
    """out_c = o_c + x_c'b."""
    p = X.shape[1]
    for c in range(X.shape[0]):
        s = off[c]
        for j in range(p):
            s += X[c, j] * beta[j]
        out[c] = s


@numba.njit(cache=True, nogil=True)
def _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u):  # pragma: no cover - compiled
    """u = sigma L v, block by block (v and u in donor order)."""
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        k = e - s
        o = loff[b]
        for i in range(k):
            acc = 0.0
            for j in range(k):
                acc += Lflat[o + i * k + j] * v[bdon[s + j]]
            u[bdon[s + i]] = sigma * acc


@numba.njit(cache=True, nogil=True)
def _nb_pass(yi, yv, codes, base, u, theta, sh, sw):  # pragma: no cover - compiled
    """Donor sums of h1 and w, and sum of h (without constants), at eta = base + u[donor]."""
    sh[:] = 0.0
    sw[:] = 0.0
    terms = np.empty(7)
    ll = 0.0
    k = 0
    nnz = yi.shape[0]
    for c in range(base.shape[0]):
        y = 0.0
        if k < nnz and yi[k] == c:
            y = yv[k]
            k += 1
        d = codes[c]
        _nb_terms(y, base[c] + u[d], theta, terms)
        ll += terms[0]
        sh[d] += terms[1]
        sw[d] += terms[2]
    return ll


@numba.njit(cache=True, nogil=True)
def _block_newton(s2, sigma, bptr, bdon, Lflat, loff, v, sh, sw, dv):  # pragma: no cover - compiled
    """Newton direction dv = H^-1 (sigma L'sh - v), H = I + s2 L' diag(sw) L block by block; returns g'dv."""
    dec = 0.0
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        k = e - s
        o = loff[b]
        if k == 1:
            d = bdon[s]
            l = Lflat[o]
            g = sigma * l * sh[d] - v[d]
            dv[d] = g / (1.0 + s2 * l * l * sw[d])
            dec += g * dv[d]
            continue
        H = np.empty((k, k))
        g = np.empty(k)
        for i in range(k):
            acc = 0.0
            for j in range(k):
                acc += Lflat[o + j * k + i] * sh[bdon[s + j]]
            g[i] = sigma * acc - v[bdon[s + i]]
            for j in range(i, k):
                acc = 0.0
                for m in range(k):
                    acc += Lflat[o + m * k + i] * sw[bdon[s + m]] * Lflat[o + m * k + j]
                H[i, j] = s2 * acc
                H[j, i] = s2 * acc
            H[i, i] += 1.0
        x = np.linalg.solve(H, g)
        for i in range(k):
            dv[bdon[s + i]] = x[i]
            dec += g[i] * x[i]
    return dec


@numba.njit(cache=True, nogil=True)
def _poisson_donor_ll(Yd, Sd, u):  # pragma: no cover - compiled
    s = 0.0
    for d in range(Yd.shape[0]):
        s += Yd[d] * u[d] - math.exp(u[d]) * Sd[d]
    return s


@numba.njit(cache=True, nogil=True)
def _inner_mode(fam, yi, yv, codes, base, theta, s2, bptr, bdon, Lflat, loff, v, Yd, Sd, work):  # pragma: no cover
    """Maximise f(v) = sum_c h_c - v'v/2 over v in place (Newton with step halving); returns (f, converged).

    For the Poisson family the donor sums collapse: mu_c = exp(base_c) exp(u_d), so given ``Sd`` (the donor sums
    of exp(base)) and ``Yd`` (the donor sums of y) no pass over the cells is needed.
    """
    n = v.shape[0]
    sigma = math.sqrt(s2)
    u, sh, sw, dv, vn = work[0], work[1], work[2], work[3], work[4]
    _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u)
    if fam == POISSON:
        f = _poisson_donor_ll(Yd, Sd, u)
    else:
        f = _nb_pass(yi, yv, codes, base, u, theta, sh, sw)
    f -= 0.5 * np.dot(v, v)
    for _ in range(INNER_MAX_ITER):
        if fam == POISSON:
            for d in range(n):
                m = math.exp(u[d]) * Sd[d]
                sh[d] = Yd[d] - m
                sw[d] = m
        dec = _block_newton(s2, sigma, bptr, bdon, Lflat, loff, v, sh, sw, dv)
        if not (dec == dec):
            return f, False
        t = 1.0
        accepted = False
        for _h in range(40):
            for d in range(n):
                vn[d] = v[d] + t * dv[d]
            _u_from_v(sigma, bptr, bdon, Lflat, loff, vn, u)
            if fam == POISSON:
                fn = _poisson_donor_ll(Yd, Sd, u)
            else:
                fn = _nb_pass(yi, yv, codes, base, u, theta, sh, sw)
            fn -= 0.5 * np.dot(vn, vn)
            if fn == fn and fn >= f - 1e-12 * abs(f):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            # no ascent left at float precision: converged if the Newton decrement is negligible
            _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u)
            if fam != POISSON:
                _nb_pass(yi, yv, codes, base, u, theta, sh, sw)
            return f, dec < 1e-8
        v[:] = vn
        f = fn
        if dec < 1e-20 or (t == 1.0 and dec < 1e-14):
            if fam != POISSON and t != 1.0:
                pass
            return f, True
    return f, False


@numba.njit(cache=True, nogil=True)
def evaluate(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, boundary, v, lfact, grad):  # pragma: no cover
    """Laplace log-likelihood at phi = (b, rho = log s2, kappa = log theta) and its analytic gradient in phi,
    written to ``grad``; ``v`` (the mode) is the warm start and is updated. ``boundary``: s2 = 0 (rho unused).

    Returns (loglik, ok). ``lfact`` is sum_c lgamma(y_c + 1).
    """
    N, p = X.shape
    beta = phi[:p]
    rho = phi[p]
    kappa = phi[p + 1]
    lconst = -lfact
    if fam == NEGATIVE_BINOMIAL:
        lt = math.lgamma(math.exp(kappa))
        for k in range(yv.shape[0]):
            lconst += math.lgamma(yv[k] + math.exp(kappa)) - lt
    n = v.shape[0]
    theta = math.exp(kappa)
    s2 = 0.0 if boundary else math.exp(rho)
    sigma = math.sqrt(s2)
    base = np.empty(N)
    _base(off, X, beta, base)
    work = np.zeros((5, n))
    Yd = np.zeros(n)
    Sd = np.zeros(n)
    E = np.zeros((n, p))  # Poisson: donor sums of exp(base) x_c
    xty = np.zeros(p)
    yb = 0.0
    for k in range(yi.shape[0]):
        c = yi[k]
        Yd[codes[c]] += yv[k]
        yb += yv[k] * base[c]
        for j in range(p):
            xty[j] += yv[k] * X[c, j]
    if fam == POISSON:
        for c in range(N):
            d = codes[c]
            e = math.exp(base[c])
            Sd[d] += e
            for j in range(p):
                E[d, j] += e * X[c, j]
    if boundary:
        v[:] = 0.0
        ok = True
    else:
        f, ok = _inner_mode(fam, yi, yv, codes, base, theta, s2, bptr, bdon, Lflat, loff, v, Yd, Sd, work)
    if not ok:
        return np.nan, False
    u = work[0]
    _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u)

    # the final pass at the mode: donor sums and cross-products for the gradient
    sh = np.zeros(n)
    sw = np.zeros(n)
    a = np.zeros(n)
    swk = np.zeros(n)
    sh1k = np.zeros(n)
    zwx = np.zeros((n, p))
    zw1x = np.zeros((n, p))
    xh = np.zeros(p)
    hk_sum = 0.0
    ll = 0.0
    if fam == POISSON:
        for d in range(n):
            eu = math.exp(u[d])
            m = eu * Sd[d]
            sh[d] = Yd[d] - m
            sw[d] = m
            a[d] = m
            for j in range(p):
                zwx[d, j] = eu * E[d, j]
                zw1x[d, j] = zwx[d, j]
                xh[j] -= zwx[d, j]
        for j in range(p):
            xh[j] += xty[j]
        ll = yb + _poisson_donor_ll(Yd, Sd, u)
    else:
        terms = np.empty(7)
        k = 0
        nnz = yi.shape[0]
        for c in range(N):
            y = 0.0
            if k < nnz and yi[k] == c:
                y = yv[k]
                k += 1
            d = codes[c]
            _nb_terms(y, base[c] + u[d], theta, terms)
            ll += terms[0]
            sh[d] += terms[1]
            sw[d] += terms[2]
            a[d] += terms[3]
            hk_sum += terms[4]
            sh1k[d] += terms[5]
            swk[d] += terms[6]
            for j in range(p):
                x = X[c, j]
                xh[j] += x * terms[1]
                zwx[d, j] += x * terms[2]
                zw1x[d, j] += x * terms[3]
    vv = np.dot(v, v)
    grad[:] = 0.0
    if boundary:
        for j in range(p):
            grad[j] = xh[j]
        grad[p + 1] = hk_sum
        return ll + lconst, True

    # block algebra: m = diag(M), M = L H^-1 L', LHv = L H^-1 v, log|H|; then Maq = M (a * q)
    logdet = 0.0
    mdiag = np.zeros(n)
    LHv = np.zeros(n)
    Maq = np.zeros(n)
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        kk = e - s
        o = loff[b]
        if kk == 1:
            d = bdon[s]
            l = Lflat[o]
            h = 1.0 + s2 * l * l * sw[d]
            logdet += math.log(h)
            mdiag[d] = l * l / h
            LHv[d] = l * v[d] / h
            Maq[d] = mdiag[d] * a[d] * s2 * mdiag[d]
            continue
        Lb = np.empty((kk, kk))
        for i in range(kk):
            for j in range(kk):
                Lb[i, j] = Lflat[o + i * kk + j]
        H = np.eye(kk)
        for i in range(kk):
            for j in range(kk):
                acc = 0.0
                for m in range(kk):
                    acc += Lb[m, i] * sw[bdon[s + m]] * Lb[m, j]
                H[i, j] += s2 * acc
        C = np.linalg.cholesky(H)
        for i in range(kk):
            logdet += 2.0 * math.log(C[i, i])
        Hinv = np.linalg.inv(H)
        Mb = Lb @ Hinv @ Lb.T
        vb = np.empty(kk)
        for i in range(kk):
            vb[i] = v[bdon[s + i]]
        lhv = Lb @ (Hinv @ vb)
        aq = np.empty(kk)
        for i in range(kk):
            d = bdon[s + i]
            mdiag[d] = Mb[i, i]
            LHv[d] = lhv[i]
            aq[i] = a[d] * s2 * Mb[i, i]
        maq = Mb @ aq
        for i in range(kk):
            Maq[bdon[s + i]] = maq[i]
    lap = ll + lconst - 0.5 * vv - 0.5 * logdet
    for j in range(p):
        acc = 0.0
        for d in range(n):
            acc += s2 * mdiag[d] * zw1x[d, j] - s2 * Maq[d] * zwx[d, j]
        grad[j] = xh[j] - 0.5 * acc
    acc = 0.0
    for d in range(n):
        acc += s2 * sw[d] * mdiag[d] + sigma * a[d] * s2 * mdiag[d] * LHv[d]
    grad[p] = 0.5 * vv - 0.5 * acc
    acc = 0.0
    for d in range(n):
        acc += s2 * mdiag[d] * swk[d] + s2 * Maq[d] * sh1k[d]
    grad[p + 1] = hk_sum - 0.5 * acc
    return lap, True


@numba.njit(cache=True, nogil=True)
def _optimise(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, free, boundary, v, lfact, Hout):  # pragma: no cover
    """Newton ascent of the Laplace log-likelihood over the free entries of phi (in place), the Hessian by finite
    differences of the analytic gradient, with step halving. Returns (loglik, status, iterations); ``Hout`` gets
    the Hessian over all of phi (zero rows for fixed entries) at the last iterate.
    """
    p = X.shape[1]
    k = p + 2
    g = np.empty(k)
    gt = np.empty(k)
    L, ok = evaluate(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, boundary, v, lfact, g)
    if not ok:
        return np.nan, FAILED, 0
    vt = v.copy()
    for it in range(MAX_ITER):
        idx = np.flatnonzero(free)
        m = idx.shape[0]
        Hm = np.empty((m, m))
        for a_ in range(m):
            j = idx[a_]
            step = FD_STEP * max(1.0, abs(phi[j]))
            ph = phi.copy()
            ph[j] += step
            vt[:] = v
            _, ok2 = evaluate(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, ph, boundary, vt, lfact, gt)
            if not ok2:
                return L, FAILED, it
            for b_ in range(m):
                Hm[b_, a_] = (gt[idx[b_]] - g[idx[b_]]) / step
        Hm = 0.5 * (Hm + Hm.T)
        Hout[:, :] = 0.0
        for a_ in range(m):
            for b_ in range(m):
                Hout[idx[a_], idx[b_]] = Hm[a_, b_]
        lam, U = np.linalg.eigh(-Hm)
        lmax = np.max(np.abs(lam))
        floor = max(1e-8 * lmax, 1e-12)
        gi = np.empty(m)
        for a_ in range(m):
            gi[a_] = g[idx[a_]]
        c = U.T @ gi
        for a_ in range(m):
            c[a_] /= max(abs(lam[a_]), floor)
        d = U @ c
        dec = np.dot(gi, d)
        if not (dec == dec):
            return L, FAILED, it
        if dec < DECREMENT_TOL:
            return L, OK, it
        t = 1.0
        for a_ in range(m):
            if abs(d[a_]) * t > 3.0:
                t = 3.0 / abs(d[a_])
        accepted = False
        for _h in range(50):
            ph = phi.copy()
            for a_ in range(m):
                ph[idx[a_]] += t * d[a_]
            if ph[p + 1] > KAPPA_MAX:
                ph[p + 1] = KAPPA_MAX
            if ph[p + 1] < KAPPA_MIN:
                ph[p + 1] = KAPPA_MIN
            vt[:] = v
            Ln, okn = evaluate(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, ph, boundary, vt, lfact, gt)
            if okn and Ln == Ln and Ln >= L + 1e-4 * t * dec - 1e-13 * abs(L):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            if dec < 1e-6:
                return L, OK, it
            return L, FAILED, it
        phi[:] = ph
        v[:] = vt
        g[:] = gt
        L = Ln
        if free[p + 1] and (phi[p + 1] >= KAPPA_MAX or phi[p + 1] <= KAPPA_MIN):
            free[p + 1] = False
        if not boundary and phi[p] < RHO_MIN:
            return L, BOUNDARY, it + 1
    return L, FAILED, MAX_ITER


@numba.njit(cache=True, nogil=True)
def _variance_score(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi):  # pragma: no cover - compiled
    """At s2 = 0: U = dl/ds2 = (|L'Z'h1|^2 - sum_d G_dd sw_d)/2 and the information proxy tr(G D_w G D_w)/2."""
    N, p = X.shape
    n = bdon.shape[0]
    base = np.empty(N)
    _base(off, X, phi[:p], base)
    sh = np.zeros(n)
    sw = np.zeros(n)
    if fam == POISSON:
        for c in range(N):
            m = math.exp(base[c])
            sh[codes[c]] -= m
            sw[codes[c]] += m
        for k in range(yi.shape[0]):
            sh[codes[yi[k]]] += yv[k]
    else:
        _nb_pass(yi, yv, codes, base, np.zeros(n), math.exp(phi[p + 1]), sh, sw)
    U = 0.0
    info = 0.0
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        kk = e - s
        o = loff[b]
        for i in range(kk):  # (L'sh)_i
            acc = 0.0
            for j in range(kk):
                acc += Lflat[o + j * kk + i] * sh[bdon[s + j]]
            U += acc * acc
        for i in range(kk):
            for j in range(kk):
                gij = 0.0
                for m in range(kk):
                    gij += Lflat[o + i * kk + m] * Lflat[o + j * kk + m]
                if i == j:
                    U -= gij * sw[bdon[s + i]]
                info += gij * gij * sw[bdon[s + i]] * sw[bdon[s + j]]
    return 0.5 * U, 0.5 * info


@numba.njit(cache=True, nogil=True)
def fit_genes_range(
    fam, lo, hi, indptr, indices, data, codes, off, X, bptr, bdon, Lflat, loff,
    beta_out, s2_out, theta_out, loglik_out, loglik0_out, status_out, iter_out, se_out, u_out,
):  # pragma: no cover - compiled
    """Fit genes lo..hi-1 (CSC columns): the s2 = 0 fit, then the interior fit when the variance score is positive.

    ``se_out`` gets the standard errors of (b, log s2, log theta) from the observed information (NaN at a boundary).
    """
    N, p = X.shape
    n = bdon.shape[0]
    k = p + 2
    H = np.zeros((k, k))
    sumoff = 0.0
    for c in range(N):
        sumoff += math.exp(off[c])
    for gidx in range(lo, hi):
        yi = indices[indptr[gidx]:indptr[gidx + 1]]
        yv = data[indptr[gidx]:indptr[gidx + 1]]
        lfact = 0.0
        tot = 0.0
        for q in range(yv.shape[0]):
            lfact += math.lgamma(yv[q] + 1.0)
            tot += yv[q]
        if yv.shape[0] < 2:
            status_out[gidx] = FAILED
            continue
        phi = np.zeros(k)
        phi[0] = math.log(tot / sumoff)
        phi[p + 1] = 0.0
        free = np.ones(k, dtype=np.bool_)
        free[p] = False
        if fam == POISSON:
            free[p + 1] = False
        v = np.zeros(n)
        L0, st0, it0 = _optimise(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, free, True, v, lfact, H)
        loglik0_out[gidx] = L0
        if st0 != OK:
            status_out[gidx] = FAILED
            iter_out[gidx] = it0
            continue
        U, info = _variance_score(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi)
        phi0 = phi.copy()
        H0 = H.copy()
        status = BOUNDARY
        L = L0
        its = it0
        if U > 0.0 and info > 0.0:
            s20 = min(max(U / info, 1e-3), 10.0)
            phi[p] = math.log(s20)
            free[:] = True
            if fam == POISSON:
                free[p + 1] = False
            if phi[p + 1] >= KAPPA_MAX or phi[p + 1] <= KAPPA_MIN:
                free[p + 1] = False
            v[:] = 0.0
            L1, st1, it1 = _optimise(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, free, False, v, lfact, H)
            its += it1
            if st1 == OK and L1 >= L0:
                status = OK
                L = L1
            elif st1 == FAILED:
                status = FAILED
        if status == BOUNDARY:
            phi[:] = phi0
            H[:, :] = H0
            v[:] = 0.0
        status_out[gidx] = status
        iter_out[gidx] = its
        loglik_out[gidx] = L
        for j in range(p):
            beta_out[gidx, j] = phi[j]
        s2_out[gidx] = math.exp(phi[p]) if status == OK else 0.0
        theta_out[gidx] = math.exp(phi[p + 1])
        # standard errors from the observed information over the free parameters
        idx = np.flatnonzero(np.abs(np.diag(H)) > 0)
        m = idx.shape[0]
        Hm = np.empty((m, m))
        for a_ in range(m):
            for b_ in range(m):
                Hm[a_, b_] = -H[idx[a_], idx[b_]]
        lam, Uv = np.linalg.eigh(Hm)
        se_out[gidx, :] = np.nan
        if m > 0 and lam[0] > 0:
            cov = (Uv / lam) @ Uv.T
            for a_ in range(m):
                se_out[gidx, idx[a_]] = math.sqrt(cov[a_, a_])
        sigma = math.sqrt(s2_out[gidx])
        _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u_out[gidx])


@numba.njit(cache=True, nogil=True)
def working_sums_range(
    fam, lo, hi, indptr, indices, data, codes, off, X, beta, u, theta, Dw, ZWX, XWX, ZWr, XWr
):  # pragma: no cover - compiled
    """Donor sums of the working model at the fit, genes lo..hi-1: expected weights ``W`` (mu for Poisson,
    mu theta/(mu + theta) for NB2) and the working residual ``r = u_d + (y - mu)/mu`` (``y~ - Xb``):
    ``Dw = Z'W1``, ``ZWX = Z'WX``, ``XWX = X'WX``, ``ZWr = Z'Wr``, ``XWr = X'Wr``. One pass over the cells per gene.
    """
    N, p = X.shape
    for g in range(lo, hi):
        if not (beta[g, 0] == beta[g, 0]):
            continue
        yi = indices[indptr[g]:indptr[g + 1]]
        yv = data[indptr[g]:indptr[g + 1]]
        th = theta[g]
        k = 0
        nnz = yi.shape[0]
        for c in range(N):
            y = 0.0
            if k < nnz and yi[k] == c:
                y = yv[k]
                k += 1
            d = codes[c]
            eta = off[c] + u[g, d]
            for j in range(p):
                eta += X[c, j] * beta[g, j]
            mu = math.exp(eta)
            w = mu if fam == POISSON else mu * th / (mu + th)
            wr = w * (u[g, d] + (y - mu) / mu)
            Dw[g, d] += w
            ZWr[g, d] += wr
            for j in range(p):
                xw = X[c, j] * w
                ZWX[g, d, j] += xw
                XWr[g, j] += X[c, j] * wr
                for m in range(j, p):
                    XWX[g, j, m] += xw * X[c, m]
        for j in range(p):
            for m in range(j):
                XWX[g, j, m] = XWX[g, m, j]
