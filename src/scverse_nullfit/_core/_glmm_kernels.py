"""Compiled per-gene kernels of the count GLMM (Laplace maximum likelihood); the maths is in ``docs/model.md``.

Notation: for one gene, ``eta_c = o_c + x_c'b + sigma (L v)_d(c)`` with ``v ~ N(0, I)`` and ``G = L L'`` (block by
block), ``h_c`` the log-density of cell c, ``h1 = dh/deta``, ``w = -d2h/deta2`` (the observed weight), ``w1 = dw/deta``,
and for the negative binomial ``hk, h1k, wk, hkk`` the derivatives of ``h, h1, w, hk`` in ``kappa = log theta``.
Every per-cell quantity enters through a sum over cells (a donor sum or a covariate cross-product). A pass over
the cells treats every cell as a zero (a branch-free loop) and then corrects the gene's non-zero cells, so zeros
are never stored; ``exp(o_c + x_c'b)`` is computed once per evaluation and the inner passes over the donor effects
only multiply it by ``exp(u_d)``. For the Poisson family the inner problem needs no pass at all: its donor sums
are ``exp(u_d)`` times donor sums fixed by ``b``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ._compiled import jit

#: Counts below this enter the terms in (y, theta) alone (digamma, trigamma, lgamma differences) through the gene's
#: histogram of counts.
YHIST = 64
#: Debug builds only (set with a separate NUMBA_CACHE_DIR): ``n_iter`` reports evaluations * 1000 + inner passes.
COUNT_EVALS = os.environ.get("SNF_COUNT_EVALS") == "1"

POISSON = 0
NEGATIVE_BINOMIAL = 1

#: log(sigma2_g) below which the donor variance counts as the boundary 0.
RHO_MIN = math.log(1e-10)
#: Bounds on log(theta); at the upper bound the negative binomial is indistinguishable from the Poisson.
KAPPA_MIN = math.log(1e-4)
KAPPA_MAX = math.log(1e6)
#: Past this log(theta), still climbing, the upper bound is tried at once (and kept if the likelihood is higher):
#: the likelihood approaches its Poisson limit like exp(-kappa), so Newton would crawl there. Tried again one unit
#: of log(theta) further each time it fails.
KAPPA_TRY = math.log(20.0)
MAX_ITER = 200
#: The negative binomial's starting values stop their Poisson GLM at this Newton decrement: the NB fit refines them.
GLM_START_TOL = 1e-2
INNER_MAX_ITER = 100
#: When a bound on the inner problem's Newton decrement at the end of a Newton step (the mode of the donor effects;
#: see :func:`_block_newton`) is below this, that step is the last, taken without a pass at its end: the Laplace
#: penalised log-likelihood there is within half the decrement of its maximum, and the mode within about its square
#: root, as after a further pass and step.
INNER_REM_TOL = 1e-14
#: The outer Newton stops when the Newton decrement g'(-H)^-1 g falls below this (log-likelihood units).
DECREMENT_TOL = 1e-10
#: Below this Newton decrement the full step's gain (half the decrement) is within the rounding of the
#: log-likelihood (a sum over all cells), so the step is taken unless the log-likelihood clearly drops.
ROUNDING_DEC = 1e-6
#: A line search that needs a step shorter than this while the Newton decrement is below 1e-6 has reached the
#: rounding floor of the log-likelihood (sums over all cells): the fit has converged.
STALL_STEP = 1e-3
#: Below this Newton decrement (the squared distance to the maximum in standard errors: 1e-2 of one here) the full
#: Newton step is the last: by Newton's quadratic convergence its end point is within about 1e-4 standard errors of
#: the maximum, and its log-likelihood within about 1e-7. Only that log-likelihood (and the mode) is evaluated
#: there, not the gradient and Hessian; the Hessian (standard errors) is the step's start's.
FINAL_DEC = 1e-4
#: ... and when no parameter moves by more than this (a flat direction, such as log(theta) far out, converges more
#: slowly: Newton's error after a step is about the step squared in these log-scale parameters).
FINAL_STEP = 1e-2
#: At the boundary (the GLM, whose Newton Hessian is the log-likelihood's own) that last step's end is not evaluated
#: when dec * (its largest move) is below this: the quadratic model's L + dec / 2 is then off by about that much
#: (the cubic term). In the interior the Hessian leaves out the log-determinant's curvature in b, and the quadratic
#: model is off by about 1e-2 dec.
FINAL_MODEL = 1e-8
#: Relative finite-difference step in log(sigma2_g) for the Hessian column of log(sigma2_g).
FD_STEP = 1e-5

# status codes
OK = 0
BOUNDARY = 1
FAILED = 2


@jit()
def _digamma(x):  # pragma: no cover - compiled
    s = 0.0
    while x < 8.0:
        s -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    t = f * (-1.0 / 12 + f * (1.0 / 120 + f * (-1.0 / 252 + f * (1.0 / 240 + f * (-1.0 / 132)))))
    return s + math.log(x) - 0.5 / x + t


@jit()
def _trigamma(x):  # pragma: no cover - compiled
    s = 0.0
    while x < 8.0:
        s += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    return s + 1.0 / x + 0.5 * f + f / x * (1.0 / 6 + f * (-1.0 / 30 + f * (1.0 / 42 + f * (-1.0 / 30))))


@jit()
def _gamma_diffs(y, theta):  # pragma: no cover - compiled
    """(psi(y + theta) - psi(theta), psi'(y + theta) - psi'(theta)) for a count y >= YHIST (the smaller counts go
    through :func:`_hist_terms`)."""
    return _digamma(y + theta) - _digamma(theta), _trigamma(y + theta) - _trigamma(theta)


@jit()
def _lgamma_ratio(y, theta):  # pragma: no cover - compiled
    """lgamma(y + theta) - lgamma(theta) for a count y >= YHIST (the smaller counts go through :func:`_hist_terms`,
    without the cancellation of two large lgammas when theta is large)."""
    return math.lgamma(y + theta) - math.lgamma(theta)


@jit()
def _hist_terms(yhist, theta, with_lgamma):  # pragma: no cover - compiled
    """Over the histogram of the counts below YHIST (``yhist[y]`` cells with count y): the sums of
    ``psi(y + theta) - psi(theta)``, of ``psi'(y + theta) - psi'(theta)`` and (``with_lgamma``) of
    ``lgamma(y + theta) - lgamma(theta)``, by the recurrences in y (one term 1/(theta + y - 1) per count)."""
    top = 0
    for y in range(1, YHIST):
        if yhist[y] > 0.0:
            top = y
    dg = 0.0
    tg = 0.0
    lg = 0.0
    sdg = 0.0
    stg = 0.0
    slg = 0.0
    for y in range(1, top + 1):
        x = theta + (y - 1)
        r = 1.0 / x
        dg += r
        tg -= r * r
        if with_lgamma:
            lg += math.log(x)
        n = yhist[y]
        if n > 0.0:
            sdg += n * dg
            stg += n * tg
            slg += n * lg
    return sdg, stg, slg


#: The zeros of a group of cells (same donor and design row, offsets differing) are summed by a power series in
#: rho_c = t (s_c - s0) when max |rho_c| <= SERIES_RHO, with at most SERIES_TERMS terms (see docs/model.md).
SERIES_RHO = 0.3
SERIES_TERMS = 44
#: A series stops after term k once rho^(k-1) (k+1)^2 is below this (the tail relative to the group's sums).
SERIES_EPS = 5e-18


@jit()
def group_moments(gptr, sig, s0, multi, kmax):  # pragma: no cover - compiled
    """The moments sum_c (s_c - s0_g)^k, k = 0..kmax, of the groups ``multi`` (one row each)."""
    mom = np.zeros((multi.shape[0], kmax + 1))
    for m in range(multi.shape[0]):
        g = multi[m]
        for c in range(gptr[g], gptr[g + 1]):
            dev = sig[c] - s0[g]
            pw = 1.0
            for k in range(kmax + 1):
                mom[m, k] += pw
                pw *= dev
    return mom


#: lgamma(y + 1) of the counts below this is looked up in a table.
LFACT_TABLE = 4096


@jit()
def _lfact(y, table):  # pragma: no cover - compiled
    """lgamma(y + 1) of a count y, from ``table`` when it holds it."""
    if y < table.shape[0]:
        return table[int(y)]
    return math.lgamma(y + 1.0)


@jit()
def regroup_columns_range(lo, hi, indptr, indices, data, inv, group, n_groups, oi, od):  # pragma: no cover
    """Columns lo..hi-1 of CSC counts with each cell c moved to row inv[c], rows sorted in every column, into
    ``oi`` (rows) and ``od`` (values) at the column's own positions: a counting sort of the column's cells by their
    group ``group[c]`` (inv is increasing within a group)."""
    cnt = np.zeros(n_groups + 1, dtype=np.int64)
    for j in range(lo, hi):
        a, b = indptr[j], indptr[j + 1]
        for k in range(a, b):
            cnt[group[indices[k]] + 1] += 1
        for g in range(n_groups):
            cnt[g + 1] += cnt[g]
        for k in range(a, b):
            c = indices[k]
            g = group[c]
            pos = a + cnt[g]
            cnt[g] += 1
            oi[pos] = inv[c]
            od[pos] = data[k]
        cnt[:] = 0


@jit()
def collapse_counts(indptr, indices, data, group, n_groups, offset, logS):  # pragma: no cover - compiled
    """The Poisson grouping of CSC counts (see ``_glmm._poisson_groups``): each column's counts summed by group
    (zero sums dropped, groups in order) and the per-gene log-likelihood constant ``sum_c y_c o_c - lgamma(y_c + 1)
    - sum_g (Y_g log S_g - lgamma(Y_g + 1))``. Returns (pointers, groups, sums, constants)."""
    genes = indptr.shape[0] - 1
    nnz = indptr[genes]
    optr = np.zeros(genes + 1, dtype=np.int64)
    oidx = np.empty(nnz, dtype=np.int64)
    odat = np.empty(nnz)
    const = np.zeros(genes)
    acc = np.zeros(n_groups)
    lf = np.empty(LFACT_TABLE)
    for y in range(LFACT_TABLE):
        lf[y] = math.lgamma(y + 1.0)
    pos = 0
    for j in range(genes):
        cst = 0.0
        for k in range(indptr[j], indptr[j + 1]):
            y = data[k]
            c = indices[k]
            cst += y * offset[c] - _lfact(y, lf)
            acc[group[c]] += y
        for g in range(n_groups):  # in group order, which a scan of all groups costs less than sorting them
            yg = acc[g]
            if yg != 0.0:
                oidx[pos] = g
                odat[pos] = yg
                pos += 1
                cst += _lfact(yg, lf) - yg * logS[g]
                acc[g] = 0.0
        optr[j + 1] = pos
        const[j] = cst
    return optr, oidx[:pos].copy(), odat[:pos].copy(), const


_K = np.arange(SERIES_TERMS + 1, dtype=np.float64)
_K[0] = 1.0
#: Per term k of the series (whose sign (-1)^(k-1) comes from Horner's rule in -t): the coefficient of the sum of
#: log(1 + rho) relative to that of delta; and the largest rho for which k terms suffice.
_CL = 1.0 / _K
_RHO_OK = np.zeros(SERIES_TERMS + 1)
_RHO_OK[2:] = (SERIES_EPS / (_K[2:] + 1.0) ** 2) ** (1.0 / (_K[2:] - 1.0))


@jit(fastmath={"contract"})
def _zero_sums(ea, Bg, full, grp, out, hess=False):  # pragma: no cover - compiled
    """For every group g, sums over its cells, all taken as zeros, of r, r q, r^2 and (with ``full``) r^2 q,
    r q (q - r) and log1p(z) (rows 0..5 of ``out``), and with ``hess`` (and ``full``) r q (q^2 - 4 r q + r^2) and
    r^2 q (2 q - r) (rows 6, 7: the analytic Hessian's), where z_c = s_c a_g, a_g = ea[donor] Bg[g] (mu_c / theta),
    q = 1/(1 + z), r = z q.

    With q0, r0 at z0 = s0 a and delta_c = r_c - r0, every sum is a polynomial in n, r0, q0 and the sums of
    delta^1..3, which are power series in rho_c = a q0 (s_c - s0) with the group's moments of s_c - s0
    (summed by Horner's rule, as many terms as rho needs); past SERIES_RHO, or when the group has fewer cells
    than terms (and ``full`` is off), cell by cell."""
    gptr, dgptr, sig, s0, hh, mom, midx = grp[0], grp[2], grp[5], grp[6], grp[7], grp[9], grp[10]
    ntp = 2
    for dd in range(dgptr.shape[0] - 1):
        e = ea[dd]
        for g in range(dgptr[dd], dgptr[dd + 1]):
            a = e * Bg[g]
            n = gptr[g + 1] - gptr[g]
            z0 = s0[g] * a
            q0 = 1.0 / (1.0 + z0)
            r0 = z0 * q0
            m = midx[g]
            d1 = 0.0
            d2 = 0.0
            d3 = 0.0
            d4 = 0.0
            dl = 0.0
            cells = False
            if m >= 0:
                t = a * q0
                rho = t * hh[g]
                nt = SERIES_TERMS
                if rho <= SERIES_RHO:  # the fewest terms for rho (_RHO_OK increases), from the last group's
                    nt = ntp
                    while nt > 2 and rho < _RHO_OK[nt - 1]:
                        nt -= 1
                    while nt < SERIES_TERMS and not (rho < _RHO_OK[nt]):
                        nt += 1
                    ntp = nt
                cells = not (rho <= SERIES_RHO) or (not full and nt >= n)
                if cells:
                    sr = 0.0
                    srq = 0.0
                    sr2 = 0.0
                    sr2q = 0.0
                    sw1 = 0.0
                    l1p = 0.0
                    s6 = 0.0
                    s7 = 0.0
                    for c in range(gptr[g], gptr[g + 1]):
                        z = sig[c] * a
                        q = 1.0 / (1.0 + z)
                        r = z * q
                        rq = r * q
                        sr += r
                        sr2 += r * r
                        srq += rq
                        if full:
                            sr2q += r * rq
                            sw1 += rq * (q - r)
                            l1p += math.log1p(z)
                            if hess:
                                s6 += rq * (q * q - 4.0 * rq + r * r)
                                s7 += r * rq * (2.0 * q - r)
                    out[0, g] = sr
                    out[1, g] = srq
                    out[2, g] = sr2
                    if full:
                        out[3, g] = sr2q
                        out[4, g] = sw1
                        out[5, g] = l1p
                        if hess:
                            out[6, g] = s6
                            out[7, g] = s7
                    continue
                mt = -t  # the signs (-1)^(k-1) of the terms, exactly
                # P(x) = sum_k mom_k x^(k-1) at x = -t and its derivatives (Horner's rule with synthetic division):
                # the sums of delta^2, delta^3, delta^4 are -x P'(x), x^2 P''(x)/2 and -x^3 P'''(x)/6 (times t q0^j)
                if full and hess:
                    for k in range(nt, 0, -1):
                        c = mom[m, k]
                        d4 = d4 * mt + d3
                        d3 = d3 * mt + d2
                        d2 = d2 * mt + d1
                        d1 = d1 * mt + c
                        dl = dl * mt + _CL[k] * c
                    dl *= t
                elif full:
                    for k in range(nt, 0, -1):
                        c = mom[m, k]
                        d3 = d3 * mt + d2
                        d2 = d2 * mt + d1
                        d1 = d1 * mt + c
                        dl = dl * mt + _CL[k] * c
                    dl *= t
                else:
                    for k in range(nt, 0, -1):
                        c = mom[m, k]
                        d2 = d2 * mt + d1
                        d1 = d1 * mt + c
                d2 *= t
                d3 *= t * t
                d4 *= t * t * t
                d1 *= t * q0
                d2 *= t * q0 * q0
                d3 *= t * q0 * q0 * q0
                d4 *= t * q0 * q0 * q0 * q0
            srq = n * r0 * q0 + (q0 - r0) * d1 - d2
            out[0, g] = n * r0 + d1
            out[1, g] = srq
            out[2, g] = n * r0 * r0 + 2.0 * r0 * d1 + d2
            if full:
                out[3, g] = n * r0 * r0 * q0 + (2.0 * r0 * q0 - r0 * r0) * d1 + (q0 - 2.0 * r0) * d2 - d3
                sdrq = r0 * q0 * d1 + (q0 - r0) * d2 - d3
                out[4, g] = (q0 - r0) * srq - 2.0 * sdrq
                out[5, g] = n * math.log1p(z0) + dl
                if hess:  # Taylor in delta around r0 of the quartics in r (the value at r0 in factored form)
                    r2 = r0 * r0
                    out[6, g] = (
                        n * r0 * q0 * (q0 * q0 - 4.0 * r0 * q0 + r2)
                        + (1.0 - 14.0 * r0 + 36.0 * r2 - 24.0 * r2 * r0) * d1
                        + (-7.0 + 36.0 * r0 - 36.0 * r2) * d2
                        + (12.0 - 24.0 * r0) * d3
                        - 6.0 * d4
                    )
                    out[7, g] = (
                        n * r2 * q0 * (2.0 * q0 - r0)
                        + (4.0 * r0 - 15.0 * r2 + 12.0 * r2 * r0) * d1
                        + (2.0 - 15.0 * r0 + 18.0 * r2) * d2
                        + (-5.0 + 12.0 * r0) * d3
                        + 3.0 * d4
                    )


@jit()
def _gene_constants(fam, yi, yv, codes, off, st):  # pragma: no cover - compiled
    """Once per gene (``aux[7]``): donor sums of y, sum_c y_c o_c and sum_c y_c x_c (``ycon``), the non-zero cells'
    donors, groups and s_c (``nzd``, ``nzg``, ``nzs``: contiguous, in the gene's order), and for the negative binomial
    the histogram of the counts below YHIST."""
    Yd, aux, yhist, ycon, grp, nzd, nzg, nzs = st[1], st[11], st[13], st[14], st[10], st[18], st[19], st[20]
    if aux[7] == 1.0:
        return
    gcell, Xg, sig = grp[1], grp[3], grp[5]
    p = Xg.shape[1]
    Yd[:] = 0.0
    ycon[:] = 0.0
    yhist[:] = 0.0
    for k in range(yi.shape[0]):
        c = yi[k]
        y = yv[k]
        Yd[codes[c]] += y
        ycon[0] += y * off[c]
        g = gcell[c]
        nzd[k] = codes[c]
        nzg[k] = g
        nzs[k] = sig[c]
        for j in range(p):
            ycon[1 + j] += y * Xg[g, j]
        if fam == NEGATIVE_BINOMIAL and y < YHIST:
            yhist[int(y)] += 1.0
    aux[7] = 1.0


@jit()
def _donor_products(Xd, cols, V):  # pragma: no cover - compiled
    """``Xd[:, cols]' V`` (len(cols) x V's columns): every entry a sum over the donors in donor order (the donor-level
    columns' cross-products, from per-donor sums), all entries accumulated together, a donor's row at a time."""
    out = np.zeros((cols.shape[0], V.shape[1]))
    for d in range(Xd.shape[0]):
        for a in range(cols.shape[0]):
            x = Xd[d, cols[a]]
            for m in range(V.shape[1]):
                out[a, m] += x * V[d, m]
    return out


@jit()
def _add_donor_pairs(M, P, dcols, sign):  # pragma: no cover - compiled
    """Add ``sign * P`` (:func:`_donor_products`, row a for the donor-level column ``dcols[a]``) to the symmetric
    ``M`` at every pair of design columns with a donor-level one: into the upper triangle, a pair of two donor-level
    columns once (from the earlier column's row), then mirrored below."""
    p = M.shape[0]
    is_d = np.zeros(p, dtype=np.bool_)
    for j in dcols:
        is_d[j] = True
    for a in range(dcols.shape[0]):
        j = dcols[a]
        for m in range(p):
            if m >= j:
                M[j, m] += sign * P[a, m]
                M[m, j] = M[j, m]
            elif not is_d[m]:
                M[m, j] += sign * P[a, m]
                M[j, m] = M[m, j]


@jit()
def _prepare(fam, yi, yv, codes, off, beta, st):  # pragma: no cover - compiled
    """Per group g: xb_g = x_g'b and Bg_g = exp(oref_g + xb_g) (so mu_c = s_c Bg_g exp(u_d)); for the Poisson family
    the donor sums of Bg S1, Bg S1 x and Bg S1 x x' (upper triangle), S1_g = sum_c s_c. Returns
    sum_c y_c (o_c + x_c'b) (from the gene's constants, :func:`_gene_constants`)."""
    buf, Sd, E, F, grp, ycon = st[0], st[2], st[3], st[4], st[10], st[14]
    ccols, dcols, Xd = st[7], st[8], st[9]
    dgptr, Xg, oref, S1 = grp[2], grp[3], grp[4], grp[8]
    _gene_constants(fam, yi, yv, codes, off, st)
    XB, Bg = buf[0], buf[1]
    p = Xg.shape[1]
    for d in range(dgptr.shape[0] - 1):  # the donor-level columns once per donor
        sd = 0.0
        for j in dcols:
            sd += Xd[d, j] * beta[j]
        for g in range(dgptr[d], dgptr[d + 1]):
            s = sd
            for j in ccols:
                s += Xg[g, j] * beta[j]
            XB[g] = s
            Bg[g] = math.exp(oref[g] + s)
    yb = ycon[0]
    for j in range(p):
        yb += beta[j] * ycon[1 + j]
    nzg, nzs, m0 = st[19], st[20], st[21]
    for k in range(yi.shape[0]):  # mu_c / e^u of the non-zero cells
        m0[k] = Bg[nzg[k]] * nzs[k]
    if fam == POISSON:  # per group only the cell-level columns; the donor-level ones from the donor's sums
        for d in range(dgptr.shape[0] - 1):
            sd = 0.0
            for j in ccols:
                E[d, j] = 0.0
                for m in ccols:
                    F[d, j, m] = 0.0
            for g in range(dgptr[d], dgptr[d + 1]):
                b = Bg[g] * S1[g]
                sd += b
                for j in ccols:
                    bx = b * Xg[g, j]
                    if bx == 0.0:
                        continue
                    E[d, j] += bx
                    for m in ccols:
                        if m >= j:
                            F[d, j, m] += bx * Xg[g, m]
            Sd[d] = sd
            for j in dcols:
                E[d, j] = Xd[d, j] * sd
            for j in dcols:
                for m in range(p):
                    if m >= j:
                        F[d, j, m] = Xd[d, j] * E[d, m]
                    else:
                        F[d, m, j] = Xd[d, j] * E[d, m]
    return yb


@jit()
def _nb_inner_pass(yi, yv, codes, eu, theta, sh, sw, st):  # pragma: no cover - compiled
    """Donor sums of h1 and w at eta = o + x'b + u[donor]: the zeros group by group, then the non-zeros."""
    Bg, zs, grp, nzd, m0 = st[0][1], st[0][2:10], st[10], st[18], st[21]
    dgptr = grp[2]
    _zero_sums(eu / theta, Bg, False, grp, zs)
    for d in range(dgptr.shape[0] - 1):
        s1 = 0.0
        s2 = 0.0
        for g in range(dgptr[d], dgptr[d + 1]):
            s1 += zs[0, g]
            s2 += zs[1, g]
        sh[d] = -theta * s1
        sw[d] = theta * s2
    for k in range(yi.shape[0]):  # the non-zeros' corrections
        d = nzd[k]
        y = yv[k]
        mu = eu[d] * m0[k]
        q = theta / (theta + mu)
        sh[d] += y * q
        sw[d] += y * (1.0 - q) * q


@jit()
def _block_apply(sigma, bptr, bdon, Lflat, loff, x, out, transpose):  # pragma: no cover - compiled
    """out = sigma L x (or sigma L'x with ``transpose``) block by block, x and out in donor order."""
    for b in range(bptr.shape[0] - 1):
        st, e = bptr[b], bptr[b + 1]
        k = e - st
        o = loff[b]
        for i in range(k):
            acc = 0.0
            for j in range(k):
                acc += (Lflat[o + j * k + i] if transpose else Lflat[o + i * k + j]) * x[bdon[st + j]]
            out[bdon[st + i]] = sigma * acc


@jit()
def _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u, eu):  # pragma: no cover - compiled
    """u = sigma L v block by block (v and u in donor order), and eu = exp(u)."""
    _block_apply(sigma, bptr, bdon, Lflat, loff, v, u, False)
    for d in range(u.shape[0]):
        eu[d] = math.exp(u[d])


@jit()
def _block_gather(k, s, o, bdon, Lflat, sw, sh):  # pragma: no cover - compiled
    """A block's factor L_b (k x k), A = diag(sqrt(sw_b)) L_b (so L_b' diag(sw_b) L_b = A'A) and sh_b."""
    Lb = Lflat[o : o + k * k].reshape(k, k)
    A = np.empty((k, k))
    shb = np.empty(k)
    for i in range(k):
        d = bdon[s + i]
        r = math.sqrt(sw[d])
        shb[i] = sh[d]
        for j in range(k):
            A[i, j] = r * Lb[i, j]
    return Lb, A, shb


@jit()
def _block_h(s2, A):  # pragma: no cover - compiled
    """A block's H = I + s2 A'A (= I + s2 L_b' diag(sw_b) L_b, :func:`_block_gather`)."""
    H = s2 * (A.T @ A)
    for i in range(A.shape[0]):
        H[i, i] += 1.0
    return H


@jit()
def _block_newton(s2, sigma, bptr, bdon, Lflat, loff, v, sh, sw, dv):  # pragma: no cover - compiled
    """Newton direction dv = H^-1 (sigma L'sh - v), H = I + s2 L' diag(sw) L block by block; returns g'dv and a bound
    on the Newton decrement at the step's end (see INNER_REM_TOL): per donor, h_d's third derivative is at most
    sw_d e^|du_d| in size over the step du = sigma L dv, so the gradient there is sigma L'rho with
    |rho_d| <= sw_d e^|du_d| du_d^2 / 2 (at most sigma |L|'|rho| in size), and H there is at least I (singleton donors:
    1 + s2 L^2 sw_d e^-|du_d|)."""
    dec = 0.0
    rem = 0.0
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        k = e - s
        o = loff[b]
        if k == 1:
            d = bdon[s]
            lo_ = Lflat[o]
            tau = s2 * lo_ * lo_
            g = sigma * lo_ * sh[d] - v[d]
            dv[d] = g / (1.0 + tau * sw[d])
            dec += g * dv[d]
            du = abs(sigma * lo_ * dv[d])
            ed = math.exp(du)
            r = 0.5 * sigma * lo_ * sw[d] * ed * du * du
            rem += r * r / (1.0 + tau * sw[d] / ed)
            continue
        Lb, A, shb = _block_gather(k, s, o, bdon, Lflat, sw, sh)
        H = _block_h(s2, A)
        g = sigma * (Lb.T @ shb)
        for i in range(k):
            g[i] -= v[bdon[s + i]]
        x = np.linalg.solve(H, g)
        du = sigma * (Lb @ x)
        for i in range(k):
            d = bdon[s + i]
            dv[d] = x[i]
            dec += g[i] * x[i]
            a = abs(du[i])
            du[i] = 0.5 * sw[d] * math.exp(a) * a * a
        R = sigma * (np.abs(Lb).T @ du)
        rem += np.dot(R, R)
    return dec, rem


@jit()
def _inner_sums(fam, yi, yv, codes, theta, eu, sh, sw, st):  # pragma: no cover - compiled
    """The donor sums of h1 and w at the donor effects exp(u) = eu."""
    st[11][1] += 1.0
    if fam == POISSON:
        Yd, Sd = st[1], st[2]
        for d in range(Yd.shape[0]):
            m = eu[d] * Sd[d]
            sh[d] = Yd[d] - m
            sw[d] = m
    else:
        _nb_inner_pass(yi, yv, codes, eu, theta, sh, sw, st)


@jit()
def _directional(sigma, bptr, bdon, Lflat, loff, v, sh, dv):  # pragma: no cover - compiled
    """(sigma L'sh - v)'dv: the derivative of f(v) along dv."""
    t = np.empty(v.shape[0])
    _block_apply(sigma, bptr, bdon, Lflat, loff, sh, t, True)
    s = 0.0
    for d in range(v.shape[0]):
        s += (t[d] - v[d]) * dv[d]
    return s


@jit()
def _inner_mode(fam, yi, yv, codes, theta, s2, bptr, bdon, Lflat, loff, v, st):  # pragma: no cover - compiled
    """Maximise the concave f(v) = sum_c h_c - v'v/2 over v in place; returns converged.

    Newton steps, halved while the derivative along the step turns clearly negative at its end (an overshoot
    past the maximum on the line); f itself is never needed, so a pass over the cells computes donor sums only.
    """
    n = v.shape[0]
    sigma = math.sqrt(s2)
    work = st[5]
    u, eu, sh, sw, dv, vn = work[0], work[1], work[2], work[3], work[4], work[5]
    _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u, eu)
    _inner_sums(fam, yi, yv, codes, theta, eu, sh, sw, st)
    for _ in range(INNER_MAX_ITER):
        dec, rem = _block_newton(s2, sigma, bptr, bdon, Lflat, loff, v, sh, sw, dv)
        if not (dec == dec):
            return False
        if rem < INNER_REM_TOL:  # the Newton step's end point is the mode (see INNER_REM_TOL)
            for d in range(n):
                v[d] += dv[d]
            return True
        t = 1.0
        accepted = False
        for _h in range(60):
            for d in range(n):
                vn[d] = v[d] + t * dv[d]
            _u_from_v(sigma, bptr, bdon, Lflat, loff, vn, u, eu)
            _inner_sums(fam, yi, yv, codes, theta, eu, sh, sw, st)
            slope = _directional(sigma, bptr, bdon, Lflat, loff, vn, sh, dv)
            if slope == slope and slope >= -0.5 * dec:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            return dec < 1e-10
        v[:] = vn
    return False


@jit()
def _prepared(fam, yi, yv, codes, off, beta, st):  # pragma: no cover - compiled
    """:func:`_prepare` at b unless the state holds it already (its cache key); returns sum_c y_c (o_c + x_c'b)."""
    key = st[6]
    p = beta.shape[0]
    same = key[0] == 1.0
    for j in range(p):
        if key[2 + j] != beta[j]:
            same = False
    if not same:
        key[1] = _prepare(fam, yi, yv, codes, off, beta, st)
        key[0] = 1.0
        for j in range(p):
            key[2 + j] = beta[j]
    return key[1]


@jit()
def _laplace(ll, boundary, s2, bptr, bdon, Lflat, loff, v, sw):  # pragma: no cover - compiled
    """The Laplace log-likelihood ll - v'v/2 - log|I + s2 L'diag(sw) L|/2 from the cells' log-likelihood ``ll`` at the
    mode v and the donor sums of w (``ll`` itself at the boundary); of both the full and the log-likelihood-only
    evaluation."""
    if boundary:
        return ll
    logdet = 0.0
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        k = e - s
        o = loff[b]
        if k == 1:
            lo_ = Lflat[o]
            logdet += math.log(1.0 + s2 * lo_ * lo_ * sw[bdon[s]])
            continue
        _, A, _ = _block_gather(k, s, o, bdon, Lflat, sw, sw)
        C = np.linalg.cholesky(_block_h(s2, A))
        for i in range(k):
            logdet += 2.0 * math.log(C[i, i])
    return ll - 0.5 * np.dot(v, v) - 0.5 * logdet


@jit()
def evaluate(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, boundary, v, lfact, grad, hess, st):
    """See :func:`_evaluate` (with the log-likelihood), for calls from Python. The fit calls :func:`_evaluate`
    itself: numba would optimise this wrapper again with all of that inlined."""  # pragma: no cover - compiled
    yes = v.shape[0] >= 0  # True, but not a literal (see _optimise)
    return _evaluate(
        fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, boundary, v, lfact, grad, hess, st, yes, yes
    )


@jit()
def _evaluate(
    fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, boundary, v, lfact, grad, hess, st, need_ll, need_grad
):
    """Laplace log-likelihood at phi = (b, rho = log s2, kappa = log theta), its analytic gradient in phi (``grad``)
    and the Hessian of the penalised log-likelihood at the mode in (b, kappa) (``hess``; its rho row and column
    are left 0). ``v`` (the mode) is the warm start and is updated; ``boundary``: s2 = 0 (rho unused); ``lfact``:
    sum_c lgamma(y_c + 1); ``st``: per-gene state (see :func:`_state`), which caches the per-cell
    quantities of the last b. Returns (loglik, ok); without ``need_ll`` (a finite-difference evaluation, which needs
    the gradient only) the log-likelihood is not computed and NaN is returned in its place; without ``need_grad``
    (the last Newton step's end point, FINAL_DEC) only the log-likelihood is, and ``grad``, ``hess`` and the mode's
    derivatives are left as they are.
    """  # pragma: no cover - compiled
    p = X.shape[1]
    n = v.shape[0]
    beta = phi[:p]
    theta = math.exp(phi[p + 1])
    s2 = 0.0 if boundary else math.exp(phi[p])
    sigma = math.sqrt(s2)
    buf, Yd, Sd, E, F, work, _, _, dcols, Xd, grp, aux, dvd, yhist, _, gcptr, gcj, gcx, _, _, _, _ = st
    aux[0 if need_grad else 8] += 1.0
    lconst = -lfact
    _gene_constants(fam, yi, yv, codes, off, st)  # the terms in (y, theta) alone go by distinct small counts
    if fam == NEGATIVE_BINOMIAL and need_ll:  # sum_c lgamma(y_c + theta) - lgamma(theta), kept per theta
        if aux[2] != 1.0 or aux[3] != theta:
            acc = _hist_terms(yhist, theta, True)[2]
            for k in range(yv.shape[0]):
                if yv[k] >= YHIST:
                    acc += _lgamma_ratio(yv[k], theta)
            aux[2] = 1.0
            aux[3] = theta
            aux[4] = acc
        lconst += aux[4]
    Bg = buf[1]
    dgptr = grp[2]
    yb = _prepared(fam, yi, yv, codes, off, beta, st)
    if boundary:
        v[:] = 0.0
    else:
        ok = _inner_mode(fam, yi, yv, codes, theta, s2, bptr, bdon, Lflat, loff, v, st)
        if not ok:
            return np.nan, False
    u, eu = work[0], work[1]
    _u_from_v(sigma, bptr, bdon, Lflat, loff, v, u, eu)

    # the final pass at the mode: donor sums and cross-products for the gradient and the Hessian (those of h1 and w
    # kept in the work rows 6 and 7)
    sh = work[6]
    sw = work[7]
    sh[:] = 0.0
    sw[:] = 0.0
    a = np.zeros(n)
    swk = np.zeros(n)
    sh1k = np.zeros(n)
    zwx = np.zeros((n, p))
    zw1x = np.zeros((n, p))
    xh = np.zeros(p)
    xh1k = np.zeros(p)
    xwx = np.zeros((p, p))
    hk_sum = 0.0
    hkk_sum = 0.0
    ll = 0.0
    # the analytic Hessian rows of (log s2, log theta) need third and fourth derivatives' donor sums (singleton
    # donors only; otherwise those rows come from finite differences in _optimise)
    hrows = (not boundary) and bptr.shape[0] - 1 == n
    nh = n if hrows else 0
    w2d = np.zeros(nh)
    w1kd = np.zeros(nh)
    wkkd = np.zeros(nh)
    s1kkd = np.zeros(nh)
    w2x = np.zeros((nh, p))
    w1kx = np.zeros((nh, p))
    wkx = np.zeros((nh, p))
    if fam == POISSON:
        for d in range(n):
            m = eu[d] * Sd[d]
            sh[d] = Yd[d] - m
            sw[d] = m
            a[d] = m
            ll += Yd[d] * u[d] - m
            for j in range(p):
                zwx[d, j] = eu[d] * E[d, j]
                zw1x[d, j] = zwx[d, j]
                xh[j] -= zwx[d, j]
                for m2 in range(j, p):
                    xwx[j, m2] += eu[d] * F[d, j, m2]
        for j in range(p):  # X'y, from the gene's constants
            xh[j] += st[14][1 + j]
        ll += yb
        if not need_grad:
            return _laplace(ll + lconst, boundary, s2, bptr, bdon, Lflat, loff, v, sw), True
    else:
        zs, cz = buf[2:10], buf[10:14]
        cz[:, :] = 0.0
        nzd, nzg, m0 = st[18], st[19], st[21]
        for k in range(yi.shape[0]):  # the non-zero cells: term(y) - term(0) in closed form, summed per group
            d = nzd[k]
            g = nzg[k]
            y = yv[k]
            mu = eu[d] * m0[k]
            t = theta + mu
            r = mu / t
            q = 1.0 - r
            if need_ll:  # -y log(1 + theta/mu) = y log(mu) - y log(theta + mu); the first summed below
                ll -= y * math.log(t)
            dw = y * r * q
            cz[1, g] += dw
            if not need_grad:
                continue
            if y >= YHIST:
                dg, tg = _gamma_diffs(y, theta)
                hk_sum += theta * dg
                hkk_sum += theta * dg + theta * theta * tg
            cz[0, g] += y * q
            cz[2, g] += dw * (q - r)
            if hrows:
                cz[3, g] += dw * (q * q - 4.0 * r * q + r * r)
            hk_sum -= y * q
            hkk_sum += y * q * (q - 1.0)
        ea = eu / theta
        _zero_sums(ea, Bg, True, grp, zs, hrows and need_grad)
        if not need_grad:  # the log-likelihood's terms: sum_c log1p(mu_c / theta), and the donor sums of w
            s_l1p = 0.0
            for d in range(n):
                swd = 0.0
                for g in range(dgptr[d], dgptr[d + 1]):
                    s_l1p += zs[5, g]
                    swd += theta * zs[1, g] + cz[1, g]
                sw[d] = swd
            ll += yb - theta * s_l1p
            for d in range(n):
                ll += Yd[d] * u[d]
            return _laplace(ll + lconst, boundary, s2, bptr, bdon, Lflat, loff, v, sw), True
        sdg, stg, _ = _hist_terms(yhist, theta, False)
        hk_sum += theta * sdg
        hkk_sum += theta * sdg + theta * theta * stg
        s_r = 0.0
        s_r2 = 0.0
        s_l1p = 0.0
        for d in range(n):  # per group: every cell as a zero (zs), plus the non-zeros' corrections (cz)
            shd = 0.0
            swd = 0.0
            ad = 0.0
            sh1kd = 0.0
            swkd = 0.0
            w2dd = 0.0
            w1kdd = 0.0
            wkkdd = 0.0
            s1kkdd = 0.0
            for g in range(dgptr[d], dgptr[d + 1]):
                z0, z1, z2, z3, z4 = zs[0, g], zs[1, g], zs[2, g], zs[3, g], zs[4, g]
                c0, c1, c2 = cz[0, g], cz[1, g], cz[2, g]
                s_r += z0
                s_r2 += z2
                s_l1p += zs[5, g]
                h1 = c0 - theta * z0
                wg = theta * z1 + c1
                h1k = c1 - theta * z2
                ag = theta * z4 + c2
                shd += h1
                swd += wg
                ad += ag
                sh1kd += h1k
                wkg = 2.0 * theta * z3 - c2
                swkd += wkg
                if hrows:  # w2, w1k, wkk and h1kk (see the docs' analytic Hessian)
                    c3, z7 = cz[3, g], zs[7, g]
                    w2g = theta * zs[6, g] + c3
                    w1kg = 2.0 * theta * z7 - c3
                    w2dd += w2g
                    w1kdd += w1kg
                    wkkdd += 2.0 * theta * (z3 - z7) + c3
                    s1kkdd += theta * (2.0 * z3 - z2) - c2
                    for q in range(gcptr[g], gcptr[g + 1]):
                        j = gcj[q]
                        x = gcx[q]
                        w2x[d, j] += x * w2g
                        w1kx[d, j] += x * w1kg
                        wkx[d, j] += x * wkg
                for q in range(gcptr[g], gcptr[g + 1]):
                    j = gcj[q]
                    x = gcx[q]
                    xh[j] += x * h1
                    xh1k[j] += x * h1k
                    zwx[d, j] += x * wg
                    zw1x[d, j] += x * ag
                    xw = x * wg
                    for q2 in range(q, gcptr[g + 1]):
                        xwx[j, gcj[q2]] += xw * gcx[q2]
            sh[d] = shd
            sw[d] = swd
            a[d] = ad
            sh1k[d] = sh1kd
            swk[d] = swkd
            if hrows:
                w2d[d] = w2dd
                w1kd[d] = w1kdd
                wkkd[d] = wkkdd
                s1kkd[d] = s1kkdd
        lfix = -theta * s_l1p
        ll += lfix
        if need_ll:  # sum_c y_c log(mu_c) = sum_c y_c (o_c + x_c'b) + sum_d y_d u_d
            ll += yb
            for d in range(n):
                ll += Yd[d] * u[d]
        hk_sum += lfix + theta * s_r
        hkk_sum += lfix + theta * s_r + theta * s_r2
        # donor-level columns from the donor sums: x_d times the donor's sums
        for d in range(n):
            for j in dcols:
                xd = Xd[d, j]
                zwx[d, j] = xd * sw[d]
                zw1x[d, j] = xd * a[d]
                xh[j] += xd * sh[d]
                xh1k[j] += xd * sh1k[d]
                if hrows:
                    w2x[d, j] = xd * w2d[d]
                    w1kx[d, j] = xd * w1kd[d]
                    wkx[d, j] = xd * swk[d]
        _add_donor_pairs(xwx, _donor_products(Xd, dcols, zwx), dcols, 1.0)
    for j in range(p):
        for m2 in range(j):
            xwx[j, m2] = xwx[m2, j]
    vv = np.dot(v, v)
    grad[:] = 0.0
    hess[:, :] = 0.0
    for j in range(p):
        for m2 in range(p):
            hess[j, m2] = -xwx[j, m2]
        hess[j, p + 1] = xh1k[j]
        hess[p + 1, j] = xh1k[j]
    hess[p + 1, p + 1] = hkk_sum
    if boundary:
        for j in range(p):
            grad[j] = xh[j]
        grad[p + 1] = hk_sum
        return ll + lconst, True

    # block algebra: m = diag(M), M = L H^-1 L', LHv = L H^-1 v, Maq = M (a * q), and the quadratic forms of M in
    # (zwx, sh1k) for the Hessian
    mdiag = np.zeros(n)
    LHv = np.zeros(n)
    Maq = np.zeros(n)
    Q = np.zeros((p + 1, p + 1))  # [zwx, sh1k]' M [zwx, sh1k]
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        kk = e - s
        o = loff[b]
        if kk == 1:
            d = bdon[s]
            lo_ = Lflat[o]
            h = 1.0 + s2 * lo_ * lo_ * sw[d]
            ih = 1.0 / h
            md = lo_ * lo_ * ih
            cj = -sigma * lo_ * ih
            for j in range(p):  # the mode's derivatives in phi (implicit function; the mode condition used)
                dvd[d, j] = cj * zwx[d, j]
            dvd[d, p] = 0.5 * v[d] * (1.0 - s2 * lo_ * lo_ * sw[d]) * ih
            sk = sh1k[d]
            dvd[d, p + 1] = sigma * lo_ * sk * ih
            mdiag[d] = md
            LHv[d] = lo_ * v[d] * ih
            Maq[d] = md * a[d] * s2 * md
            for j in range(p):
                mz = md * zwx[d, j]
                for m2 in range(j, p):
                    Q[j, m2] += mz * zwx[d, m2]
                Q[j, p] += mz * sk
            Q[p, p] += md * sk * sk
            continue
        Lb, A, _ = _block_gather(kk, s, o, bdon, Lflat, sw, sh)
        H = _block_h(s2, A)
        Hinv = np.linalg.inv(H)
        Mb = Lb @ (Hinv @ Lb.T)
        vb = np.empty(kk)
        Zb = np.empty((kk, p + 1))
        for i in range(kk):
            d = bdon[s + i]
            vb[i] = v[d]
            for j in range(p):
                Zb[i, j] = zwx[d, j]
            Zb[i, p] = sh1k[d]
        lhv = Lb @ (Hinv @ vb)
        Rb = np.empty((kk, p + 2))
        wlv = Lb @ vb
        for i in range(kk):
            d = bdon[s + i]
            wlv[i] *= sw[d]
            for j in range(p):
                Rb[i, j] = -sigma * Zb[i, j]
            Rb[i, p] = 0.0
            Rb[i, p + 1] = sigma * Zb[i, p]
        Rb = Lb.T @ Rb
        Lw = Lb.T @ wlv
        for i in range(kk):
            Rb[i, p] = 0.5 * (vb[i] - s2 * Lw[i])
        Db = Hinv @ Rb
        for i in range(kk):
            for j in range(p + 2):
                dvd[bdon[s + i], j] = Db[i, j]
        aq = np.empty(kk)
        for i in range(kk):
            d = bdon[s + i]
            mdiag[d] = Mb[i, i]
            LHv[d] = lhv[i]
            aq[i] = a[d] * s2 * Mb[i, i]
        maq = Mb @ aq
        Qb = Zb.T @ (Mb @ Zb)
        for i in range(kk):
            Maq[bdon[s + i]] = maq[i]
        for j in range(p + 1):
            for m2 in range(j, p + 1):
                Q[j, m2] += Qb[j, m2]
    lap = _laplace(ll + lconst, False, s2, bptr, bdon, Lflat, loff, v, sw) if need_ll else np.nan
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
    # penalised-likelihood Hessian: -X'WX + s2 ZWX'M ZWX, X'h1k - s2 ZWX'M sh1k, sum hkk + s2 sh1k'M sh1k
    for j in range(p):
        for m2 in range(j, p):
            hess[j, m2] += s2 * Q[j, m2]
            hess[m2, j] = hess[j, m2]
        hess[j, p + 1] -= s2 * Q[j, p]
        hess[p + 1, j] = hess[j, p + 1]
    hess[p + 1, p + 1] += s2 * Q[p, p]
    if hrows:
        _rho_kappa_rows(fam, s2, bdon, Lflat, loff, u, sw, a, swk, sh1k, zwx, zw1x, w2d, w1kd, wkkd, s1kkd, w2x,
                        w1kx, wkx, hess)  # fmt: skip
        for j in range(p + 2):
            hess[j, p] = hess[p, j]
        for j in range(p):
            hess[j, p + 1] = hess[p + 1, j]
    return lap, True


@jit()
def _rho_kappa_rows(
    fam, s2, bdon, Lflat, loff, u, sw, a, swk, sh1k, zwx, zw1x, w2d, w1kd, wkkd, s1kkd, w2x, w1kx, wkx, hess
):  # pragma: no cover - compiled
    """The rows of log(s2) and log(theta) of the Laplace log-likelihood's Hessian (singleton donors), with the mode's
    first and second derivatives in phi and the log-determinant's: ``hess[p]`` is set, ``hess[p + 1]`` gets the
    log-determinant's share added to the penalised part already there (columns b and log(theta); the caller makes
    them symmetric). Per donor: tau = s2 G_dd, H = 1 + tau W; see docs/model.md."""
    n = u.shape[0]
    p = zwx.shape[1]
    nb = fam == NEGATIVE_BINOMIAL
    hr = np.zeros(p + 2)
    hq = np.zeros(p + 2)
    for b in range(n):
        d = bdon[b]
        tau = s2 * Lflat[loff[b]] * Lflat[loff[b]]
        if not (tau > 0.0):
            continue
        W = sw[d]
        W1 = a[d]
        if nb:
            W2 = w2d[d]
            Wk, W1k, Wkk, S1k, S1kk = swk[d], w1kd[d], wkkd[d], sh1k[d], s1kkd[d]
        else:
            W2 = W
            Wk = W1k = Wkk = S1k = S1kk = 0.0
        ud = u[d]
        h = 1.0 + tau * W
        ih = 1.0 / h
        cc = tau * ih
        ut = ud / tau
        # the mode's derivatives in log(s2) and log(theta), then the log-determinant's derivatives (H_a, H_ab)
        ur = ud * ih
        uk = cc * S1k
        Dr = W1 * ur
        Dk = W1 * uk + Wk
        Hr = tau * (W + Dr)
        Hk = tau * Dk
        urr = cc * (-W1 * ur * ur + 2.0 * ur / tau - ut)
        urk = cc * (-W1 * ur * uk + uk / tau - Wk * ur)
        ukk = cc * (-W1 * uk * uk - 2.0 * Wk * uk + S1kk)
        Drr = W2 * ur * ur + W1 * urr
        Drk = (W2 * uk + W1k) * ur + W1 * urk
        Dkk = (W2 * uk + 2.0 * W1k) * uk + W1 * ukk + Wkk
        Hrr = tau * (W + 2.0 * Dr + Drr)
        Hrk = tau * (Dk + Drk)
        Hkk = tau * Dkk
        hr[p] += ud * ut * (ih - 0.5) - 0.5 * (Hrr - Hr * Hr * ih) * ih
        hr[p + 1] += ud * S1k * ih - 0.5 * (Hrk - Hr * Hk * ih) * ih
        hq[p + 1] -= 0.5 * (Hkk - Hk * Hk * ih) * ih
        for j in range(p):
            Wx = zwx[d, j]
            W1x = zw1x[d, j]
            if nb:
                W2x, W1kx, Wkx = w2x[d, j], w1kx[d, j], wkx[d, j]
            else:
                W2x, W1kx, Wkx = Wx, 0.0, 0.0
            uj = -cc * Wx
            Dj = W1 * uj + W1x
            Hj = tau * Dj
            urj = cc * (-W1 * ur * uj + uj / tau - W1x * ur)
            ukj = cc * (-W1 * uk * uj - Wk * uj - W1x * uk - Wkx)
            Drj = (W2 * uj + W2x) * ur + W1 * urj
            Dkj = (W2 * uj + W2x) * uk + W1 * ukj + W1k * uj + W1kx
            hr[j] += -ud * Wx * ih - 0.5 * (tau * (Dj + Drj) - Hr * Hj * ih) * ih
            hq[j] -= 0.5 * (tau * Dkj - Hk * Hj * ih) * ih
    for j in range(p + 2):
        hess[p, j] = hr[j]
    for j in range(p):
        hess[p + 1, j] += hq[j]
    hess[p + 1, p + 1] += hq[p + 1]


@jit()
def _step_length(d):  # pragma: no cover - compiled
    """The first step length tried along ``d``: 1, or less so that no parameter moves by more than 3."""
    t = 1.0
    for a in range(d.shape[0]):
        if abs(d[a]) * t > 3.0:
            t = 3.0 / abs(d[a])
    return t


@jit()
def _ascent_direction(Hm, gi):  # pragma: no cover - compiled
    """Newton direction -Hm^-1 gi, made an ascent direction: on the unit-diagonal scaling of -Hm (so that
    covariates on large scales do not set the tolerance), eigenvalues below 1e-10 of the largest are floored."""
    m = gi.shape[0]
    sc = np.empty(m)
    for a_ in range(m):
        h = abs(Hm[a_, a_])
        sc[a_] = 1.0 / math.sqrt(h) if h > 0 else 1.0
    A = np.empty((m, m))
    for a_ in range(m):
        for b_ in range(m):
            A[a_, b_] = -Hm[a_, b_] * sc[a_] * sc[b_]
    lam, U = np.linalg.eigh(A)
    floor = max(1e-10 * np.max(np.abs(lam)), 1e-300)
    c = U.T @ (gi * sc)
    for a_ in range(m):
        c[a_] /= max(abs(lam[a_]), floor)
    return (U @ c) * sc


@jit()
def _warm_start(boundary, v, phi, ph, dva, vt):  # pragma: no cover - compiled
    """The mode at ``ph`` to first order from the mode ``v`` at ``phi`` and its derivatives ``dva``, into ``vt``
    (v itself at the boundary)."""
    vt[:] = v
    if not boundary:
        for a_ in range(phi.shape[0]):
            dp = ph[a_] - phi[a_]
            if dp != 0.0:
                for dd in range(vt.shape[0]):
                    vt[dd] += dp * dva[dd, a_]


@jit()
def _accept(phi, ph, v, vt, g, gt, Ha, Ht, fd):  # pragma: no cover - compiled
    """Take the trial point: parameters, mode and gradient, and the analytic Hessian columns (the finite-difference
    columns are kept while their parameter barely moves: an older column only slows Newton)."""
    phi[:] = ph
    v[:] = vt
    g[:] = gt
    k = fd.shape[0]
    for j in range(k):
        if not fd[j]:
            for i in range(k):
                if not fd[i]:
                    Ha[j, i] = Ht[j, i]


@jit()
def _optimise(
    fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, free, v, lfact, Hout, st, sums
):  # pragma: no cover
    """Newton ascent of the Laplace log-likelihood over the free entries of phi (in place), with step halving.

    The Hessian: the penalised-likelihood Hessian in b, and the rows and columns of log(sigma2_g) and log(theta)
    of the Laplace log-likelihood's (the log-determinant matters most there): analytic with singleton donors,
    else by finite differences of the analytic gradient. Returns (loglik, status, iterations); ``Hout`` gets that
    Hessian over all of phi (zero rows for fixed entries); ``sums`` (2 x donors) the donor sums of h1 and w at the
    returned phi, or at the last step's start when that step's end was evaluated for its log-likelihood only
    (FINAL_DEC). The fit at the boundary s2 = 0 is the one with log(s2) fixed.

    Its flags, and those it passes to :func:`_evaluate`, are runtime values, not literals: numba compiles a function
    once per combination of literal arguments, and these two are the largest kernels (their first compile took minutes
    when they were literals)."""
    p = X.shape[1]
    k = p + 2
    boundary = not free[p]
    yes = k > 0
    no = not yes
    g = np.empty(k)
    gt = np.empty(k)
    Ha = np.empty((k, k))
    Ht = np.empty((k, k))
    L, ok = _evaluate(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, boundary, v, lfact, g, Ha, st, yes, yes)
    if not ok:
        return np.nan, FAILED, 0
    sums[:, :] = st[5][6:8]
    vt = v.copy()
    dva = st[12].copy()  # the mode's derivatives in phi at phi: warm starts extrapolated along a step
    # rows/columns of the Hessian taken from finite differences of the gradient: log(s2), and log(theta) in the
    # interior (the log-determinant's share of their curvature is not small); refreshed while they still move
    # (singleton donors: evaluate's Hessian has them analytically)
    fd = np.zeros(k, dtype=np.bool_)
    fd[p] = not boundary and bptr.shape[0] - 1 != v.shape[0]
    fd[p + 1] = fd[p] and fam == NEGATIVE_BINOMIAL
    moved = np.full(k, np.inf)
    next_jump = KAPPA_TRY
    for it in range(MAX_ITER):
        for j0 in range(p, k):
            if not (fd[j0] and free[j0] and (it < 2 or abs(moved[j0]) > 1e-3)):
                continue
            step = FD_STEP * max(1.0, abs(phi[j0]))
            ph = phi.copy()
            ph[j0] += step
            for dd in range(vt.shape[0]):
                vt[dd] = v[dd] + step * dva[dd, j0]
            st[11][5] += 1.0
            _, ok2 = _evaluate(
                fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, ph, boundary, vt, lfact, gt, Ht, st, no, yes
            )
            if not ok2:
                return L, FAILED, it
            for j in range(k):
                Ha[j, j0] = (gt[j] - g[j]) / step
            for j in range(k):
                Ha[j0, j] = Ha[j, j0]
        for j0 in range(p, k):  # symmetric in the two finite-difference columns
            for j1 in range(p, k):
                if fd[j0] and fd[j1] and j1 > j0:
                    Ha[j0, j1] = Ha[j1, j0] = 0.5 * (Ha[j0, j1] + Ha[j1, j0])
        act = free.copy()  # log(theta) at a bound with the gradient pointing out of it is held there this step
        if (phi[p + 1] >= KAPPA_MAX and g[p + 1] >= 0.0) or (phi[p + 1] <= KAPPA_MIN and g[p + 1] <= 0.0):
            act[p + 1] = False
        idx = np.flatnonzero(act)
        m = idx.shape[0]
        Hm = np.empty((m, m))
        gi = np.empty(m)
        for a_ in range(m):
            gi[a_] = g[idx[a_]]
            for b_ in range(m):
                Hm[a_, b_] = Ha[idx[a_], idx[b_]]
        Hout[:, :] = 0.0
        for a_ in range(m):
            for b_ in range(m):
                Hout[idx[a_], idx[b_]] = Hm[a_, b_]
        d = _ascent_direction(Hm, gi)
        dec = np.dot(gi, d)
        if not (dec == dec):
            return L, FAILED, it
        if dec < DECREMENT_TOL:
            return L, OK, it
        t = _step_length(d)
        big = np.max(np.abs(d))
        if dec < FINAL_DEC and big < FINAL_STEP and (not boundary or dec * big < FINAL_MODEL):  # the last step
            ph = phi.copy()
            for a_ in range(m):
                ph[idx[a_]] += d[a_]
            if KAPPA_MIN <= ph[p + 1] <= KAPPA_MAX and (boundary or ph[p] >= RHO_MIN):
                if boundary:  # the quadratic model's log-likelihood (FINAL_MODEL)
                    phi[:] = ph
                    return L + 0.5 * dec, OK, it + 1
                _warm_start(boundary, v, phi, ph, dva, vt)
                Ln, okn = _evaluate(
                    fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, ph, boundary, vt, lfact, gt, Ht, st, yes, no
                )
                if okn and Ln == Ln and Ln >= L - 1e-13 * abs(L):
                    phi[:] = ph
                    v[:] = vt
                    return Ln, OK, it + 1
        accepted = False
        for _h in range(50):
            ph = phi.copy()
            for a_ in range(m):
                ph[idx[a_]] += t * d[a_]
            if ph[p + 1] > KAPPA_MAX:
                ph[p + 1] = KAPPA_MAX
            if ph[p + 1] < KAPPA_MIN:
                ph[p + 1] = KAPPA_MIN
            _warm_start(boundary, v, phi, ph, dva, vt)
            Ln, okn = _evaluate(
                fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, ph, boundary, vt, lfact, gt, Ht, st, yes, yes
            )
            armijo = Ln >= L + 1e-4 * t * dec - 1e-13 * abs(L)
            rounding = t == 1.0 and dec < ROUNDING_DEC and Ln >= L - 1e-12 * abs(L)
            if okn and Ln == Ln and (armijo or rounding):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            if dec < 1e-6:
                return L, OK, it
            return L, FAILED, it
        for j in range(p, k):
            moved[j] = ph[j] - phi[j]
        _accept(phi, ph, v, vt, g, gt, Ha, Ht, fd)
        dva[:, :] = st[12]
        sums[:, :] = st[5][6:8]
        L = Ln
        if t < STALL_STEP and dec < 1e-6:  # the log-likelihood's rounding, not the model, stops the steps
            return L, OK, it + 1
        if free[p + 1] and phi[p + 1] > next_jump and g[p + 1] > 0.0:
            next_jump = phi[p + 1] + 1.0
            ph = phi.copy()
            ph[p + 1] = KAPPA_MAX
            vt[:] = v
            Ln, okn = _evaluate(
                fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, ph, boundary, vt, lfact, gt, Ht, st, yes, yes
            )
            if okn and Ln >= L and gt[p + 1] >= 0.0:  # still climbing at the bound: the Poisson limit is the sup
                _accept(phi, ph, v, vt, g, gt, Ha, Ht, fd)
                dva[:, :] = st[12]
                sums[:, :] = st[5][6:8]
                L = Ln
        if not boundary and phi[p] < RHO_MIN:
            return L, BOUNDARY, it + 1
    return L, FAILED, MAX_ITER


@jit()
def _state(p, n, grp):  # pragma: no cover - compiled
    """Per-gene scratch of :func:`evaluate`: (x_g'b and exp(oref_g + x_g'b) per group, donor sums of y, of mu / e^u,
    of mu x / e^u, of mu x x' / e^u (Poisson), the inner-problem work rows (rows 6, 7: the donor sums of h1 and w of
    the last evaluation's final pass), the cache key [valid, sum y base, b]), then the design's split: the
    cell-level columns, the donor-level ones (constant within every donor) and the donor-level values (donors x p),
    the groups ``grp`` (see ``_glmm._by_donor``), ``aux`` [evaluations, inner passes, valid, theta,
    sum_c lgamma(y_c + theta) - lgamma(theta) at that theta, finite-difference evaluations, boundary-fit evaluations,
    gene constants valid, log-likelihood-only evaluations], the mode's derivatives in phi at the last evaluation
    (donors x (p + 2)), the histogram of the gene's counts below YHIST, the gene's constants ``ycon``
    (:func:`_gene_constants`), each group's non-zero cell-level columns (pointers, columns, values), and per non-zero
    cell of the gene its donor, group, s_c and mu_c / e^u at the last b. The caches (key, aux) belong to one gene:
    reset key[0], aux[2] and aux[7] before the next. Donor-level columns need no per-group work: their sums follow
    from donor sums."""
    dgptr, Xg = grp[2], grp[3]
    G = Xg.shape[0]
    N = grp[0][G]
    Xd = np.zeros((n, p))
    is_donor = np.ones(p, dtype=np.bool_)
    for d in range(n):
        if dgptr[d + 1] > dgptr[d]:
            for j in range(p):
                Xd[d, j] = Xg[dgptr[d], j]
        for g in range(dgptr[d], dgptr[d + 1]):
            for j in range(p):
                if Xg[g, j] != Xd[d, j]:
                    is_donor[j] = False
    ccols = np.flatnonzero(~is_donor)
    gcptr = np.zeros(G + 1, dtype=np.int64)
    for g in range(G):
        m = 0
        for j in ccols:
            if Xg[g, j] != 0.0:
                m += 1
        gcptr[g + 1] = gcptr[g] + m
    gcj = np.empty(gcptr[G], dtype=np.int64)
    gcx = np.empty(gcptr[G])
    for g in range(G):
        q = gcptr[g]
        for j in ccols:
            if Xg[g, j] != 0.0:
                gcj[q] = j
                gcx[q] = Xg[g, j]
                q += 1
    return (
        np.zeros((14, G)),
        np.empty(n),
        np.empty(n),
        np.empty((n, p)),
        np.empty((n, p, p)),
        np.zeros((8, n)),
        np.zeros(p + 2),
        ccols,
        np.flatnonzero(is_donor),
        Xd,
        grp,
        np.zeros(9),
        np.zeros((n, p + 2)),
        np.zeros(YHIST),
        np.zeros(p + 1),
        gcptr,
        gcj,
        gcx,
        np.empty(N, dtype=np.int64),
        np.empty(N, dtype=np.int64),
        np.empty(N),
        np.empty(N),
    )


@jit()
def _group_glm_pass(b, Yg, grp, ccols, dcols, Xd, gcptr, gcj, gcx, gr, Hm):  # pragma: no cover - compiled
    """The Poisson GLM of the groups' summed counts ``Yg`` at ``b``: returns sum_g Yg x_g'b - mu_g (the
    log-likelihood less a constant), with ``gr`` = -sum_g mu_g x_g and ``Hm`` = -sum_g mu_g x_g x_g' (donor-level
    columns through donor sums, so a group costs only its non-zero cell-level columns ``gcj``, ``gcx``; the sums
    over donors then run one accumulator at a time)."""
    dgptr, oref, S1 = grp[2], grp[4], grp[8]
    p = Xd.shape[1]
    n = dgptr.shape[0] - 1
    gr[:] = 0.0
    Hm[:, :] = 0.0
    md = np.empty(n)  # per donor: sum of mu, and of mu x over the cell-level columns
    mcd = np.zeros((n, p))
    nd = dcols.shape[0]
    ll = 0.0
    for d in range(n):
        xbd = 0.0
        for j in dcols:
            xbd += Xd[d, j] * b[j]
        m_ = 0.0
        for g in range(dgptr[d], dgptr[d + 1]):
            q0, q1 = gcptr[g], gcptr[g + 1]
            xb = xbd
            for q in range(q0, q1):
                xb += gcx[q] * b[gcj[q]]
            mu = math.exp(oref[g] + xb) * S1[g]
            ll += Yg[g] * xb - mu
            m_ += mu
            for q in range(q0, q1):
                j = gcj[q]
                mx = mu * gcx[q]
                mcd[d, j] += mx
                for q2 in range(q0, q1):
                    Hm[j, gcj[q2]] -= mx * gcx[q2]
        md[d] = m_
    for j in ccols:
        acc = 0.0
        for d in range(n):
            acc += mcd[d, j]
        gr[j] -= acc
    for d in range(n):  # the donor-level columns' mu x per donor, beside the cell-level ones
        for j in dcols:
            mcd[d, j] = Xd[d, j] * md[d]
    P = _donor_products(Xd, dcols, mcd)
    Pg = _donor_products(Xd, dcols, md.reshape(n, 1))
    for a in range(nd):
        gr[dcols[a]] -= Pg[a, 0]
    _add_donor_pairs(Hm, P, dcols, -1.0)
    return ll


@jit()
def _glm_start(fam, yi, yv, phi, S2, st):  # pragma: no cover - compiled
    """Starting values of the s2 = 0 fit: b of the Poisson GLM of the groups' summed counts (Newton's method with
    step halving, passes over the groups only, none over the cells), then for the negative binomial the moment
    estimate 1/theta = sum_c ((y_c - mu_c)^2 - y_c) / sum_c mu_c^2 at it (``S2``: the groups' sums of s_c^2).
    ``phi`` is left as it is when a step fails to be finite."""
    grp, ccols, dcols, Xd, gcptr, gcj, gcx = st[10], st[7], st[8], st[9], st[15], st[16], st[17]
    gcell, Xg, oref, sig = grp[1], grp[3], grp[4], grp[5]
    G, p = Xg.shape
    Yg = np.zeros(G)
    for k in range(yi.shape[0]):
        Yg[gcell[yi[k]]] += yv[k]
    xy = np.zeros(p)
    for g in range(G):
        for j in range(p):
            xy[j] += Xg[g, j] * Yg[g]
    b = phi[:p].copy()
    gr = np.empty(p)
    Hm = np.empty((p, p))
    gt = np.empty(p)
    Ht = np.empty((p, p))
    ll = _group_glm_pass(b, Yg, grp, ccols, dcols, Xd, gcptr, gcj, gcx, gr, Hm)
    if not (ll == ll) or abs(ll) == np.inf:
        return
    for _ in range(30):
        for j in range(p):
            gr[j] += xy[j]
        d = _ascent_direction(Hm, gr)
        dec = np.dot(gr, d)
        if not (dec == dec) or dec < (1e-8 if fam == POISSON else GLM_START_TOL):
            break
        t = _step_length(d)
        ok = False
        for _h in range(30):
            bt = b + t * d
            lt = _group_glm_pass(bt, Yg, grp, ccols, dcols, Xd, gcptr, gcj, gcx, gt, Ht)
            if lt == lt and lt >= ll + 1e-4 * t * dec:
                ok = True
                break
            t *= 0.5
        if not ok:
            break
        b[:] = bt
        ll = lt
        gr[:] = gt
        Hm[:, :] = Ht
    for j in range(p):
        phi[j] = b[j]
    if fam == NEGATIVE_BINOMIAL:
        s_mu2 = 0.0
        Bg = np.empty(G)
        for g in range(G):
            xb = 0.0
            for j in range(p):
                xb += Xg[g, j] * b[j]
            Bg[g] = math.exp(oref[g] + xb)
            s_mu2 += Bg[g] * Bg[g] * S2[g]
        num = s_mu2
        for k in range(yi.shape[0]):
            c = yi[k]
            y = yv[k]
            num += y * (y - 1.0 - 2.0 * Bg[gcell[c]] * sig[c])
        inv = num / s_mu2
        if inv == inv and s_mu2 > 0.0:
            inv = max(inv, 1e-3)
            phi[p + 1] = min(max(-math.log(inv), KAPPA_MIN), KAPPA_MAX)


@jit()
def _variance_score(bptr, bdon, Lflat, loff, sh, sw):  # pragma: no cover - compiled
    """At s2 = 0: U = dl/ds2 = (|L'Z'h1|^2 - sum_d G_dd sw_d)/2 and the information proxy tr(G D_w G D_w)/2, from
    the donor sums ``sh`` and ``sw`` of h1 and w there."""
    U = 0.0
    info = 0.0
    for b in range(bptr.shape[0] - 1):
        s, e = bptr[b], bptr[b + 1]
        kk = e - s
        o = loff[b]
        if kk == 1:
            d = bdon[s]
            gdd = Lflat[o] * Lflat[o]
            U += gdd * (sh[d] * sh[d] - sw[d])
            info += gdd * gdd * sw[d] * sw[d]
            continue
        Lb, _, shb = _block_gather(kk, s, o, bdon, Lflat, sw, sh)
        Ls = Lb.T @ shb
        U += np.dot(Ls, Ls)
        Gb = Lb @ Lb.T
        for i in range(kk):
            swi = sw[bdon[s + i]]
            U -= Gb[i, i] * swi
            for j in range(kk):
                info += Gb[i, j] * Gb[i, j] * swi * sw[bdon[s + j]]
    return 0.5 * U, 0.5 * info


@jit()
def _s2_start(s2, bptr, bdon, Lflat, loff, sh, sw):  # pragma: no cover - compiled
    """A start for s2 (singleton donors; ``s2`` itself otherwise, the score step U / info from 0): the maximum of the
    donors' normal approximation at s2 = 0 (donor effect estimates sh_d / sw_d with variances 1/sw_d + s2 G_dd),
    the sum over donors of (sh_d^2 tau_d / h_d - log h_d) / 2, tau_d = s2 G_dd, h_d = 1 + tau_d sw_d, by Newton's
    method in log(s2) from ``s2``; ``s2`` when that fails."""
    n = bdon.shape[0]
    if bptr.shape[0] - 1 != n or not (s2 > 0.0):
        return s2
    r = math.log(min(max(s2, 1e-3), 10.0))
    for _ in range(30):
        e = math.exp(r)
        g1 = 0.0
        g2 = 0.0
        for b in range(n):
            d = bdon[b]
            tau = e * Lflat[loff[b]] * Lflat[loff[b]]
            ih = 1.0 / (1.0 + tau * sw[d])
            s2h = sh[d] * sh[d] * ih * ih
            g1 += tau * (s2h - sw[d] * ih)
            g2 += tau * tau * (sw[d] * sw[d] * ih * ih - 2.0 * s2h * sw[d] * ih)
        g2 += g1
        if not (g1 == g1 and g2 < 0.0):
            return s2
        step = min(max(-g1 / g2, -2.0), 2.0)
        r += step
        if abs(step) < 1e-8:
            break
    if not (r == r) or r > 10.0:
        return s2
    return math.exp(r)


@jit()
def _mode_start(s2, shift, sh, sw, bptr, bdon, Lflat, loff, v):  # pragma: no cover - compiled
    """A warm start of the interior fit's first mode, singleton donors only (v = 0 elsewhere): each donor's
    u_d = tau_d (sh_d + sw_d (1 - e^(u_d + shift))), tau_d = s2 G_dd, solved by Newton's method, from the donor sums
    ``sh``, ``sw`` of h1 and w at u = 0 (exact for the Poisson family with ``shift`` the change of the linear
    predictor; for the negative binomial its Poisson approximation)."""
    sigma = math.sqrt(s2)
    v[:] = 0.0
    for b in range(bptr.shape[0] - 1):
        if bptr[b + 1] - bptr[b] != 1:
            continue
        d = bdon[bptr[b]]
        lo_ = Lflat[loff[b]]
        tau = s2 * lo_ * lo_
        if not (tau > 0.0) or not (sw[d] >= 0.0):
            continue
        u = 0.0
        for _ in range(30):
            e = sw[d] * math.exp(u + shift)
            du = (sh[d] + sw[d] - e - u / tau) / (e + 1.0 / tau)
            u += du
            if not (abs(du) > 1e-12 * (1.0 + abs(u))):
                break
        if u == u:
            v[d] = u / (sigma * lo_)


@jit()
def fit_constants(off, X, grp):  # pragma: no cover - compiled
    """What every gene of a layout shares (once per layout, not per range of genes): sum_c exp(o_c), whether the
    first design column is the intercept, the groups' sums of s_c^2 and a table of lgamma(y + 1)."""
    N, p = X.shape
    sumoff = 0.0
    for c in range(N):
        sumoff += math.exp(off[c])
    intercept = p > 0
    for c in range(N):
        if p > 0 and X[c, 0] != 1.0:
            intercept = False
    lft = np.empty(LFACT_TABLE)
    for y in range(LFACT_TABLE):
        lft[y] = math.lgamma(y + 1.0)
    S2 = np.zeros(grp[0].shape[0] - 1)
    for c in range(N):
        S2[grp[1][c]] += grp[5][c] * grp[5][c]
    return sumoff, intercept, S2, lft


@jit()
def fit_genes_range(
    fam,
    lo,
    hi,
    indptr,
    indices,
    data,
    codes,
    off,
    X,
    grp,
    bptr,
    bdon,
    Lflat,
    loff,
    beta_out,
    s2_out,
    theta_out,
    loglik_out,
    loglik0_out,
    status_out,
    iter_out,
    se_out,
    u_out,
    consts,
):  # pragma: no cover - compiled
    """Fit genes lo..hi-1 (CSC columns): the s2 = 0 fit, then the interior fit when the variance score is positive.

    ``se_out`` gets the standard errors of (b, log s2, log theta) from the Hessian of the last Newton step
    (NaN where a parameter sits at a boundary); ``consts``: :func:`fit_constants` of the layout.
    """
    p = X.shape[1]
    n = bdon.shape[0]
    k = p + 2
    H = np.zeros((k, k))
    eu = np.empty(n)
    st = _state(p, n, grp)
    sumoff, intercept, S2, lft = consts
    sums0 = np.zeros((2, n))
    sums1 = np.zeros((2, n))
    sh0, sw0 = sums0[0], sums0[1]
    for gidx in range(lo, hi):
        st[11][:2] = 0.0
        st[11][5:] = 0.0
        st[11][2] = 0.0
        yi = indices[indptr[gidx] : indptr[gidx + 1]]
        yv = data[indptr[gidx] : indptr[gidx + 1]]
        lfact = 0.0
        tot = 0.0
        for q in range(yv.shape[0]):
            lfact += _lfact(yv[q], lft)
            tot += yv[q]
        if yv.shape[0] < 2:
            status_out[gidx] = FAILED
            continue
        phi = np.zeros(k)
        phi[0] = math.log(tot / sumoff)
        free = np.ones(k, dtype=np.bool_)
        free[p] = False
        if fam == POISSON:
            free[p + 1] = False
        v = np.zeros(n)
        _glm_start(fam, yi, yv, phi, S2, st)
        st[6][0] = 0.0
        L0, st0, it0 = _optimise(fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, free, v, lfact, H, st, sums0)
        loglik0_out[gidx] = L0
        st[11][6] = st[11][0]
        if st0 != OK:
            status_out[gidx] = FAILED
            iter_out[gidx] = it0
            continue
        U, info = _variance_score(bptr, bdon, Lflat, loff, sh0, sw0)
        phi0 = phi.copy()
        H0 = H.copy()
        status = BOUNDARY
        L = L0
        its = it0
        if U > 0.0 and info > 0.0:
            s2i = min(max(_s2_start(U / info, bptr, bdon, Lflat, loff, sh0, sw0), 1e-3), 10.0)
            phi[p] = math.log(s2i)
            if fam == NEGATIVE_BINOMIAL:  # the boundary fit's overdispersion, less the donor effects' share
                ib = math.exp(-phi[p + 1])
                ii = max(ib - math.expm1(s2i), 0.25 * ib) * math.exp(-s2i)
                phi[p + 1] = min(max(-math.log(ii), KAPPA_MIN), KAPPA_MAX)
            shift = 0.0
            if intercept:  # E exp(u) = exp(s2 / 2)
                phi[0] -= 0.5 * s2i
                shift = -0.5 * s2i
            free[:] = True
            if fam == POISSON:
                free[p + 1] = False
            _mode_start(s2i, shift, sh0, sw0, bptr, bdon, Lflat, loff, v)
            L1, st1, it1 = _optimise(
                fam, yi, yv, codes, off, X, bptr, bdon, Lflat, loff, phi, free, v, lfact, H, st, sums1
            )
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
        if COUNT_EVALS:
            iter_out[gidx] = ((int(st[11][0]) * 100 + int(st[11][5] + st[11][8])) * 100 + int(st[11][6])) * 1000 + int(
                st[11][1]
            )
        loglik_out[gidx] = L
        for j in range(p):
            beta_out[gidx, j] = phi[j]
        s2_out[gidx] = math.exp(phi[p]) if status == OK else 0.0
        theta_out[gidx] = math.exp(phi[p + 1])
        idx = np.flatnonzero(np.abs(np.diag(H)) > 0)
        m = idx.shape[0]
        Hm = np.empty((m, m))
        for a_ in range(m):
            for b_ in range(m):
                Hm[a_, b_] = -H[idx[a_], idx[b_]]
        se_out[gidx, :] = np.nan
        if m > 0:  # the inverse of the observed information, through its unit-diagonal scaling
            sc = np.empty(m)
            for a_ in range(m):
                sc[a_] = 1.0 / math.sqrt(Hm[a_, a_]) if Hm[a_, a_] > 0 else 1.0
            for a_ in range(m):
                for b_ in range(m):
                    Hm[a_, b_] *= sc[a_] * sc[b_]
            lam, Uv = np.linalg.eigh(Hm)
            if lam[0] > 1e-12 * lam[m - 1]:
                cov = (Uv / lam) @ Uv.T
                for a_ in range(m):
                    se_out[gidx, idx[a_]] = math.sqrt(cov[a_, a_]) * sc[a_]
        _u_from_v(math.sqrt(s2_out[gidx]), bptr, bdon, Lflat, loff, v, u_out[gidx], eu)


@jit()
def working_sums_range(
    fam, lo, hi, indptr, indices, data, codes, off, X, grp, beta, u, theta, Dw, ZWX, XWX, ZWr, XWr
):  # pragma: no cover - compiled
    """Donor sums of the working model at the fit, genes lo..hi-1: expected weights ``W`` (mu for Poisson,
    mu theta/(mu + theta) for NB2) and the working residual ``r = u_d + (y - mu)/mu`` (``y~ - Xb``):
    ``Dw = Z'W1``, ``ZWX = Z'WX``, ``XWX = X'WX``, ``ZWr = Z'Wr``, ``XWr = X'Wr``. ``W r = W (u_d - 1) + y q``
    (q = theta/(mu + theta), 1 for Poisson): the zeros enter group by group through the group's sum of ``W``, then
    the non-zeros add ``y q``.
    """
    p = X.shape[1]
    dgptr, Xg, oref, S1, gcell, sig = grp[2], grp[3], grp[4], grp[8], grp[1], grp[5]
    G = Xg.shape[0]
    n = dgptr.shape[0] - 1
    st = _state(p, n, grp)
    ccols, dcols, Xd = st[7], st[8], st[9]
    Bg = np.empty(G)
    ea = np.empty(n)
    zs = np.zeros((6, G))
    wdv = np.empty(n)
    zr = np.empty(n)
    yq = np.zeros(G)
    for g in range(lo, hi):
        if not (beta[g, 0] == beta[g, 0]):
            continue
        yi = indices[indptr[g] : indptr[g + 1]]
        yv = data[indptr[g] : indptr[g + 1]]
        th = theta[g]
        for h in range(G):
            xb = oref[h]
            for j in range(p):
                xb += Xg[h, j] * beta[g, j]
            Bg[h] = math.exp(xb)
        for d in range(n):
            ea[d] = math.exp(u[g, d])
        if fam != POISSON:
            _zero_sums(ea / th, Bg, False, grp, zs)
        for d in range(n):  # per group only the cell-level columns; the donor-level ones from the donor sums below
            ud = u[g, d]
            wd = 0.0
            for h in range(dgptr[d], dgptr[d + 1]):
                W = ea[d] * Bg[h] * S1[h] if fam == POISSON else th * zs[0, h]
                wd += W
                wr = W * (ud - 1.0)
                for j in ccols:
                    x = Xg[h, j]
                    if x == 0.0:
                        continue
                    xw = x * W
                    ZWX[g, d, j] += xw
                    XWr[g, j] += x * wr
                    for m in ccols:
                        if m >= j:
                            XWX[g, j, m] += xw * Xg[h, m]
            wdv[d] = wd
            zr[d] = wd * (ud - 1.0)
        for k in range(yi.shape[0]):  # the non-zero cells' y q, summed per group (whose design row they share)
            c = yi[k]
            y = yv[k]
            h = gcell[c]
            if fam != POISSON:
                mu = ea[codes[c]] * Bg[h] * sig[c]
                y *= th / (th + mu)
            yq[h] += y
        for d in range(n):
            sd = 0.0
            for h in range(dgptr[d], dgptr[d + 1]):
                y = yq[h]
                if y != 0.0:
                    sd += y
                    for j in ccols:
                        XWr[g, j] += Xg[h, j] * y
                    yq[h] = 0.0
            zr[d] += sd
            Dw[g, d] += wdv[d]
            ZWr[g, d] += zr[d]
        for d in range(n):  # the donor-level columns: x_d times the donor sums, then their sums over donors
            for j in dcols:
                ZWX[g, d, j] += Xd[d, j] * wdv[d]
        P = _donor_products(Xd, dcols, ZWX[g])
        Pr = _donor_products(Xd, dcols, zr.reshape(n, 1))
        for a in range(dcols.shape[0]):
            XWr[g, dcols[a]] += Pr[a, 0]
        _add_donor_pairs(XWX[g], P, dcols, 1.0)
        for j in range(p):
            for m in range(j):
                XWX[g, j, m] = XWX[g, m, j]
