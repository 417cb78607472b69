"""Step 4 of the pipeline: exact REML over tau for many genes at once.

Every gene enters through its rotated OLS residual donor sums ``r~`` (donors) and its within-donor sum of
squares ``W``; with ``w_j = 1/(1 + tau lam_j)`` (see ``docs/model.md``)

    y'P_H y = W + sum_j w_j r~_j^2 - b'A^-1 b,    A = X'H^-1X = A_w + X~' diag(w) X~,    b = X~'((w - 1) r~)
    log|H| + log|X'H^-1 X| = sum_j log(1 + tau mu_j) + log|X'X|

where ``mu`` are the eigenvalues of the donor-level ``E = Lam^1/2 (I - X~ (X'X)^-1 X~') Lam^1/2`` (eigenvalues only:
one tridiagonalisation, shared by all genes). An evaluation at a per-gene tau costs one ``genes x donors`` by
``donors x p(p+1)/2`` GEMM (the packed outer products of the rotated covariates) and O(donors p) per gene; the
shared grid is one GEMM for all genes. No second rotation of the genes is needed. The last evaluation of the search
is each gene's result (fixed effects, ``(X'H^-1X)^-1``, rotated GLS residuals).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scanpy import logging as logg
from scipy import linalg

from ._compiled import jit
from ._design import Donors, Spectral, donor_sums
from ._read import available_threads
from ._suffstats import scaled_cholesky

#: The shared tau grid: the boundary 0, then 3 points per decade over [1e-6, 1e6].
TAU_GRID = np.concatenate([[0.0], np.logspace(-6, 6, 25)])
#: Relative step in tau at which the Newton search stops.
XTOL = 1e-10
#: A Newton step below this relative size lands within about its square of the maximum: the search stops there.
NEAR = 1e-5
MAX_ITER = 100
#: Columns of the per-gene sums returned by :func:`_evaluate_kernel`.
_DQ, _WV2, _H1, _H2, _H3 = range(5)


_FAST = {"reassoc", "contract"}  # sums may be vectorised (the same order for a gene whatever the chunk or thread)


@jit(fastmath=_FAST)
def _weights_kernel(tau, rows, Rt, lam, XT, XR, w_out, b_out, wr2_out):  # pragma: no cover - compiled
    """Per gene i (row ``rows[i]`` of ``Rt``): w = 1/(1 + tau_i lam), b = X~'((w - 1) r~) (``XR = Rt X~``) and
    sum w r~^2."""
    p, n = XT.shape
    wr = np.empty(n)
    for i in range(tau.shape[0]):
        t = tau[i]
        g = rows[i]
        s = 0.0
        for j in range(n):
            w = 1.0 / (1.0 + t * lam[j])
            r = Rt[g, j]
            w_out[i, j] = w
            wr[j] = w * r
            s += w * r * r
        wr2_out[i] = s
        for k in range(p):
            acc = 0.0
            for j in range(n):
                acc += wr[j] * XT[k, j]
            b_out[i, k] = acc - XR[g, k]


@jit(fastmath=_FAST)
def _evaluate_kernel(tau, rows, Rt, lam, mu, XT, w, beta, resid_out, c_out, sums):  # pragma: no cover - compiled
    """Per gene i at tau_i with GLS coefficients ``beta[i]``: the rotated GLS residuals d = r~ - X~ beta (written to
    ``resid_out[rows[i]]``), e = w d, v = lam e, ``c_out[i] = X~'(w v)`` and
    ``sums[i] = (sum lam e^2, sum w v^2, sum mu u, sum (mu u)^2, sum (mu u)^3)`` with u = 1/(1 + tau mu).
    """
    p, n = XT.shape
    m = mu.shape[0]
    wv = np.empty(n)
    for i in range(tau.shape[0]):
        t = tau[i]
        g = rows[i]
        d = resid_out[g]
        for j in range(n):
            d[j] = Rt[g, j]
        for k in range(p):
            bk = beta[i, k]
            for j in range(n):
                d[j] -= XT[k, j] * bk
        dq = 0.0
        wv2 = 0.0
        for j in range(n):
            e = w[i, j] * d[j]
            v = lam[j] * e
            dq += v * e
            x = w[i, j] * v
            wv[j] = x
            wv2 += x * v
        for k in range(p):
            acc = 0.0
            for j in range(n):
                acc += wv[j] * XT[k, j]
            c_out[i, k] = acc
        h1 = 0.0
        h2 = 0.0
        h3 = 0.0
        for k in range(m):
            mu_u = mu[k] / (1.0 + t * mu[k])
            h1 += mu_u
            h2 += mu_u * mu_u
            h3 += mu_u * mu_u * mu_u
        sums[i, 0] = dq
        sums[i, 1] = wv2
        sums[i, 2] = h1
        sums[i, 3] = h2
        sums[i, 4] = h3


@jit(fastmath=_FAST)
def _third_kernel(rows, lam, XT, w, resid, gamma, out):  # pragma: no cover - compiled
    """Per gene i: out[i] = sum lam z^2 with z = w (v - X~ gamma), v = lam w d, d = ``resid[rows[i]]``."""
    p, n = XT.shape
    z = np.empty(n)
    for i in range(rows.shape[0]):
        g = rows[i]
        for j in range(n):
            z[j] = lam[j] * w[i, j] * resid[g, j]
        for k in range(p):
            gk = gamma[i, k]
            for j in range(n):
                z[j] -= XT[k, j] * gk
        s = 0.0
        for j in range(n):
            x = w[i, j] * z[j]
            s += lam[j] * x * x
        out[i] = s


@dataclass
class Evaluation:
    """REML quantities at one tau per gene (arrays over genes first); the GLS residuals are written in place."""

    loglik: np.ndarray | None
    dloglik: np.ndarray
    d2loglik: np.ndarray
    q: np.ndarray  #: r'P_H r
    beta: np.ndarray  #: (genes, p) GLS coefficients of r
    Ainv: np.ndarray  #: (genes, p, p) (X'H^-1 X)^-1
    d3loglik: np.ndarray | None = None


class RemlProblem:
    """The parts of the REML shared by all genes, with vectorised evaluation and search."""

    def __init__(self, spectral: Spectral, mu: np.ndarray | None = None):
        self.lam = np.ascontiguousarray(spectral.lam)
        self.Xrot = np.ascontiguousarray(spectral.Xrot)
        self.XT = np.ascontiguousarray(self.Xrot.T)
        self.Aw = spectral.Aw
        self.N = spectral.n_cells
        self.p = spectral.Xrot.shape[1]
        self.df = self.N - self.p
        if self.df <= 0:
            raise ValueError(f"the design has {self.p} columns but there are only {self.N} cells.")
        p = self.p
        self._iu = np.triu_indices(p)
        # packed outer products x~_k x~_k' (upper triangle), so all genes' X'H^-1X come from one GEMM
        self.O = np.ascontiguousarray(self.Xrot[:, self._iu[0]] * self.Xrot[:, self._iu[1]])
        L, scale = scaled_cholesky(spectral.XtX)
        self.logdet_XtX = 2.0 * (np.log(np.diag(L)).sum() - np.log(scale).sum())
        self._const = self.df * (np.log(2 * np.pi / self.df) + 1.0) + self.logdet_XtX
        self.mu = restricted_spectrum(spectral) if mu is None else mu
        self._mu8 = np.concatenate([self.mu, np.zeros(-len(self.mu) % 8)]).reshape(-1, 8)  # zeros add log(1) = 0
        self._Ainv0 = _spd_inverse((self.Aw + self.Xrot.T @ self.Xrot)[None])[0]  # (X'X)^-1, as at tau = 0
        self._grid_setup(TAU_GRID)

    def _grid_setup(self, taus: np.ndarray) -> None:
        """Per grid point: the weights w, and M_t with b'A^-1b = ||r~' M_t||^2 (the same for every gene)."""
        self.grid_taus = np.asarray(taus, dtype=np.float64)
        pos = self.grid_taus[self.grid_taus > 0]
        w = 1.0 / (1.0 + pos[None, :] * self.lam[:, None])  # (donors, taus)
        A = self._unpack(w.T @ self.O) + self.Aw
        K = _inverse_factor(A)  # A_t^-1 = K_t K_t'
        f = 1.0 - w
        M = np.einsum("jk,jt,tkl->jtl", self.Xrot, f, K).reshape(len(self.lam), -1)
        self._grid_w = np.ascontiguousarray(w)
        self._grid_M = np.ascontiguousarray(M)
        self._grid_logdet = np.log1p(pos[:, None] * self.mu[None, :]).sum(axis=1)

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        p = self.p
        out = np.empty((packed.shape[0], p, p))
        out[:, self._iu[0], self._iu[1]] = packed
        out[:, self._iu[1], self._iu[0]] = packed
        return out

    def _loglik(self, q, logdet):
        return -0.5 * (self.df * np.log(q) + self._const + logdet)

    # -- the REML on (r~, W) -----------------------------------------------------------------------------------

    def grid(self, Rt: np.ndarray, W: np.ndarray) -> np.ndarray:
        """REML log-likelihood of every gene at every grid tau: (len(grid), genes)."""
        G = Rt.shape[0]
        T = len(self._grid_logdet)
        out = np.empty((T + 1, G))
        R2 = Rt * Rt
        q0 = W + R2.sum(axis=1)
        q = (R2 @ self._grid_w).T  # (taus, genes)
        del R2
        q += W
        B = (Rt @ self._grid_M).reshape(G, T, self.p)
        q -= np.einsum("gtk,gtk->tg", B, B)
        del B
        with np.errstate(invalid="ignore", divide="ignore"):
            out[0] = self._loglik(np.where(q0 > 0, q0, np.nan), 0.0)
            out[1:] = self._loglik(np.where(q > 0, q, np.nan), self._grid_logdet[:, None])
        return out

    def _evaluate_at_zero(self, rows, Rt, W, resid, *, with_loglik: bool) -> Evaluation:
        """:meth:`evaluate` at tau = 0, where H = I: ``A = X'X``, the GLS fit of r is 0 and every sum is a GEMM."""
        m = len(rows)
        R = Rt[rows]
        resid[rows] = R
        R2 = R * R
        sums = R2 @ np.stack([np.ones_like(self.lam), self.lam, self.lam * self.lam], axis=1)
        c = R @ (self.lam[:, None] * self.Xrot)
        Ainv = np.broadcast_to(self._Ainv0, (m, self.p, self.p))
        q = W[rows] + sums[:, 0]
        dq = -sums[:, 1]
        d2q = 2.0 * (sums[:, 2] - np.einsum("gk,kl,gl->g", c, self._Ainv0, c))
        h1, h2 = self.mu.sum(), (self.mu * self.mu).sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            loglik = self._loglik(np.where(q > 0, q, np.nan), 0.0) if with_loglik else None
            r = dq / q
            dl = -0.5 * (self.df * r + h1)
            d2l = -0.5 * (self.df * (d2q / q - r * r) - h2)
        return Evaluation(loglik, dl, d2l, q, np.zeros((m, self.p)), Ainv)

    def logdet(self, tau: np.ndarray) -> np.ndarray:
        """``log|K'HK| = sum_j log(1 + tau mu_j)`` at a per-gene ``tau``: one log per 8 factors (whose product cannot
        overflow), one log each for the rare genes with a factor above 1e30."""
        tau = np.asarray(tau, dtype=np.float64)
        out = np.empty(len(tau))
        for a in range(0, len(tau), 256):  # blocks of genes: temporaries of a few MB
            t = tau[a : a + 256]
            f = np.multiply.outer(t, self._mu8)
            big = (f > 1e30).any(axis=(1, 2))
            f += 1.0
            out[a : a + 256] = np.log(f.prod(axis=2)).sum(axis=1)
            if big.any():
                out[a : a + 256][big] = np.log1p(np.multiply.outer(t[big], self.mu)).sum(axis=1)
        return out

    def evaluate(self, tau: np.ndarray, rows: np.ndarray, Rt: np.ndarray, W: np.ndarray, XR: np.ndarray,
                 resid: np.ndarray, *, with_loglik: bool = True) -> Evaluation:  # fmt: skip
        """Exact REML quantities of the genes ``rows`` (of ``Rt``, ``W``, ``XR = Rt X~``) at a per-gene ``tau``.

        The rotated GLS residuals are written into ``resid[rows]``; the log-likelihood itself (not needed by the
        Newton steps) only ``with_loglik``.
        """
        tau = np.ascontiguousarray(tau, dtype=np.float64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(tau) and not tau.any():
            return self._evaluate_at_zero(rows, Rt, W, resid, with_loglik=with_loglik)
        m, n, p = len(tau), len(self.lam), self.p
        w = np.empty((m, n))
        b = np.empty((m, p))
        wr2 = np.empty(m)
        _weights_kernel(tau, rows, Rt, self.lam, self.XT, XR, w, b, wr2)
        A = self._unpack(w @ self.O)
        A += self.Aw
        Ainv = _spd_inverse(A)
        beta = np.einsum("gkl,gl->gk", Ainv, b)
        sums = np.empty((m, 5))
        c = np.empty((m, p))
        _evaluate_kernel(tau, rows, Rt, self.lam, self.mu, self.XT, w, beta, resid, c, sums)
        gamma = np.einsum("gkl,gl->gk", Ainv, c)
        d3 = np.empty(m)
        _third_kernel(rows, self.lam, self.XT, w, resid, gamma, d3)  # the between part of P V P y: w (v - X~ gamma)
        d3q = -6.0 * d3
        del w
        q = W[rows] + wr2 - np.einsum("gk,gk->g", b, beta)
        dq = -sums[:, _DQ]
        d2q = 2.0 * (sums[:, _WV2] - np.einsum("gk,gk->g", c, gamma))
        with np.errstate(invalid="ignore", divide="ignore"):
            loglik = self._loglik(np.where(q > 0, q, np.nan), self.logdet(tau)) if with_loglik else None
            r = dq / q
            dl = -0.5 * (self.df * r + sums[:, _H1])
            d2l = -0.5 * (self.df * (d2q / q - r * r) - sums[:, _H2])
            d3l = -0.5 * (self.df * (d3q / q - 3.0 * r * d2q / q + 2.0 * r**3) + 2.0 * sums[:, _H3])
        return Evaluation(loglik, dl, d2l, q, beta, Ainv, d3l)


def restricted_spectrum(spectral: Spectral) -> np.ndarray:
    """Eigenvalues ``mu`` (clipped at 0) of ``E = Lam^1/2 (I - X~ (X'X)^-1 X~') Lam^1/2``; no eigenvectors."""
    L, scale = scaled_cholesky(spectral.XtX)  # diag(scale) X'X diag(scale) = L L'
    Qx = linalg.solve_triangular(L, (spectral.Xrot * scale).T, lower=True, check_finite=False).T  # X~ (X'X)^-1/2
    B = np.sqrt(spectral.lam)[:, None] * Qx
    E = -(B @ B.T)
    E[np.diag_indices_from(E)] += spectral.lam
    return _eigenvalues(E)


def restricted_spectrum_from_grm(G: np.ndarray, donors: Donors, X: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`restricted_spectrum` without the eigenvectors of ``M = D^1/2 G D^1/2``, so that it can run alongside
    their computation: ``E`` has the eigenvalues of ``S M S`` with ``S = (I - B B')^1/2``, ``B = D^-1/2 Z'X (X'X)^-1/2``
    (``I - B B'`` is positive semi-definite because ``X'X`` includes the between-donor ``X~'X~``).

    Returns ``mu`` and the trace of ``M``: ``M`` is not clipped at 0 here, so where its eigenvalues were (their sum
    exceeds the trace), :func:`problem_from_stage1` uses :func:`restricted_spectrum` instead.
    """
    counts = donors.counts
    ZtX = donor_sums(X, donors)
    L, scale = scaled_cholesky(X.T @ X)
    sqrt_c = np.sqrt(counts)
    B = linalg.solve_triangular(L, (ZtX / sqrt_c[:, None] * scale).T, lower=True, check_finite=False).T
    s, Vc = np.linalg.eigh(B.T @ B)  # eigenvalues in [0, 1]
    s = np.clip(s, 0.0, 1.0)
    K = B @ (Vc * np.sqrt(1.0 / (1.0 + np.sqrt(1.0 - s))))  # S = I - K K'
    M = G * sqrt_c[:, None] * sqrt_c[None, :]
    P = M @ K
    SMS = M - K @ P.T - P @ K.T + K @ (K.T @ P) @ K.T
    return _eigenvalues((SMS + SMS.T) / 2), float(np.trace(M))


def problem_from_stage1(spectral: Spectral, mu_and_trace: tuple[np.ndarray, float]) -> RemlProblem:
    """The :class:`RemlProblem` from stage 1's two parts, computed independently (see
    :func:`restricted_spectrum_from_grm`)."""
    mu, trace = mu_and_trace
    clipped = spectral.lam.sum() - trace  # the eigenvalues of M set to 0
    exact = clipped <= 1e-10 * len(spectral.lam) * max(spectral.lam.max(initial=0.0), 1e-300)
    return RemlProblem(spectral, mu=mu if exact else None)


def _eigenvalues(E: np.ndarray) -> np.ndarray:
    try:
        mu = linalg.eigh(E, eigvals_only=True, check_finite=False, overwrite_a=True, driver="evd")
    except (np.linalg.LinAlgError, ValueError) as err:
        raise ValueError(
            f"the eigendecomposition of the covariate-restricted donor matrix failed ({err}); check the GRM for "
            "extreme values."
        ) from err
    return np.ascontiguousarray(np.clip(mu, 0.0, None))


def _inverse_factor(A: np.ndarray) -> np.ndarray:
    """``K`` with ``A^-1 = K K'`` for a stack of symmetric positive semi-definite matrices (pseudo-inverse when
    singular)."""
    s, Q = np.linalg.eigh(A)
    top = np.max(np.abs(s), axis=-1, keepdims=True)
    keep = s > top * A.shape[-1] * np.finfo(float).eps
    inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, s, 1.0)), 0.0)
    return Q * inv_sqrt[..., None, :]


def warm_up() -> None:
    """Compile (or load from numba's cache) this module's kernels, for the argument types the fit uses.

    Called in the background while stage 1 and the pass over the expression run, so that the first fit in a
    process does not wait for the compiler when it reaches the REML.
    """
    n, p = 2, 1
    one, rows, lam = np.ones(1), np.zeros(1, dtype=np.int64), np.ones(n)
    M, P = np.ones((1, n)), np.ones((1, p))
    _weights_kernel(one, rows, M, lam, M.copy(), P, np.empty((1, n)), np.empty((1, p)), np.empty(1))
    _evaluate_kernel(one, rows, M, lam, lam, M.copy(), M, P, np.empty((1, n)), np.empty((1, p)), np.empty((1, 5)))
    _third_kernel(rows, lam, M.copy(), M, M, P, np.empty(1))


def _parabola_start(grid: np.ndarray, ll: np.ndarray, best: np.ndarray) -> np.ndarray:
    """The vertex of the parabola in log tau through each gene's best grid point and its two neighbours (the
    grid is geometric above 0); the best grid point itself where that is not defined."""
    tau = grid[best].copy()
    inner = np.flatnonzero((best >= 2) & (best <= len(grid) - 2))
    if len(inner):
        b = best[inner]
        y0, y1, y2 = ll[b - 1, inner], ll[b, inner], ll[b + 1, inner]
        curv = y0 - 2.0 * y1 + y2
        with np.errstate(invalid="ignore", divide="ignore"):
            step = 0.5 * (y0 - y2) / curv  # in grid steps, within (-1/2, 1/2] for a concave triple
        ok = np.isfinite(step) & (curv < 0)
        h = np.log(grid[3] / grid[2])
        tau[inner[ok]] *= np.exp(np.clip(step[ok], -0.5, 0.5) * h)
    return tau


def search(problem: RemlProblem, Rt: np.ndarray, W: np.ndarray, resid: np.ndarray, out: GeneFits) -> None:
    """Maximise the REML log-likelihood over tau >= 0 for every gene of ``Rt`` (genes x donors).

    A shared grid brackets each gene's maximum (started at the parabola through the best three grid values); a
    safeguarded Newton iteration (bisection when a step leaves the bracket or the curvature is not negative)
    refines it, all genes at once, until the step is below ``XTOL`` relative (the evaluated tau is the answer), or a
    Newton step below ``NEAR`` relative, whose end point is then exact to about ``NEAR**2`` and evaluated once more.
    Each gene's result is its last evaluation: ``out`` receives tau, loglik, converged, n_iter, tau_se, beta, Ainv
    and sigma2_e; ``resid`` the rotated GLS residuals.
    """
    grid = problem.grid_taus
    G = Rt.shape[0]
    XR = Rt @ problem.Xrot
    ll = problem.grid(Rt, W)
    best = np.argmax(np.where(np.isfinite(ll), ll, -np.inf), axis=0)
    tau = _parabola_start(grid, ll, best)
    lo = grid[np.maximum(best - 1, 0)]
    hi = grid[np.minimum(best + 1, len(grid) - 1)]
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)

    def finish(idx, ev, sel=slice(None)):
        out.tau[idx] = tau[idx]
        loglik = ev.loglik[sel] if ev.loglik is not None else None
        if loglik is None:
            q = ev.q[sel]
            with np.errstate(invalid="ignore", divide="ignore"):
                loglik = problem._loglik(np.where(q > 0, q, np.nan), problem.logdet(tau[idx]))
        out.loglik[idx] = loglik
        out.sigma2_e[idx] = ev.q[sel] / problem.df
        out.beta[idx] = ev.beta[sel]
        out.Ainv[idx] = ev.Ainv[sel]
        d2l = ev.d2loglik[sel]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.tau_se[idx] = np.where(d2l < 0, np.sqrt(-1.0 / d2l), np.nan)

    # maxima on the grid's ends: a boundary solution when the slope points outwards
    ends = np.flatnonzero((best == 0) | (best == len(grid) - 1))
    if len(ends):
        ev = problem.evaluate(tau[ends], ends, Rt, W, XR, resid, with_loglik=False)
        at_zero = best[ends] == 0
        outward = np.where(at_zero, ev.dloglik <= 0, ev.dloglik >= 0)
        converged[ends[outward]] = True
        finish(ends[outward], ev, outward)
        start = ends[at_zero & ~outward]
        tau[start] = 0.5 * grid[1]
        lo[start] = 0.0

    active = np.flatnonzero(~converged)
    last = np.zeros(0, dtype=np.int64)  # genes whose last Newton step lands within NEAR**2 of the maximum
    for it in range(1, MAX_ITER + 1):
        if not len(active):
            break
        t = tau[active]
        ev = problem.evaluate(t, active, Rt, W, XR, resid, with_loglik=False)
        dl, d2l = ev.dloglik, ev.d2loglik
        up = dl > 0
        lo[active] = np.where(up, t, lo[active])
        hi[active] = np.where(up, hi[active], t)
        lo_a, hi_a = lo[active], hi[active]
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = t - dl / d2l
            if ev.d3loglik is not None:  # Halley's step (cubic convergence) where it stays in the bracket
                halley = t - 2.0 * dl * d2l / (2.0 * d2l * d2l - dl * ev.d3loglik)
                closer = np.abs(halley - newton) < np.abs(newton - t)  # a refinement of Newton's step, not a jump
                use = np.isfinite(halley) & (halley > lo_a) & (halley < hi_a) & closer
                newton = np.where(use, halley, newton)
        good = (d2l < 0) & (newton > lo_a) & (newton < hi_a)
        mid = np.where(lo_a > 0, np.sqrt(lo_a * hi_a), 0.5 * (lo_a + hi_a))
        new = np.where(dl == 0, t, np.where(good, newton, mid))  # a zero slope is the answer itself
        step = np.abs(new - t)
        done = (step <= XTOL * np.maximum(t, 1e-300)) | (hi_a - lo_a <= XTOL * hi_a) | (dl == 0)
        near = ~done & good & (step <= NEAR * t)
        n_iter[active] = it
        converged[active[done]] = True
        finish(active[done], ev, done)  # the evaluated tau, within XTOL of the next step
        tau[active[~done]] = new[~done]
        last = np.concatenate([last, active[near]])
        n_iter[active[near]] = it + 1
        active = active[~done & ~near]
    converged[last] = True
    rest = np.concatenate([last, active])  # the last step's tau (not converged: the last one reached)
    if len(rest):
        finish(rest, problem.evaluate(tau[rest], rest, Rt, W, XR, resid))
    out.converged[:] = converged
    out.n_iter[:] = n_iter


def _spd_inverse(A: np.ndarray) -> np.ndarray:
    """Inverses of a stack of symmetric positive definite matrices, exactly symmetric.

    A numerically singular matrix (possible only at extreme tau) gets its pseudo-inverse instead of an error.
    """
    try:
        Ainv = np.linalg.inv(A)
    except np.linalg.LinAlgError:
        Ainv = np.linalg.pinv(A, hermitian=True)
    Ainv += np.swapaxes(Ainv, -1, -2)
    Ainv *= 0.5
    return Ainv


def h2_pvalue(loglik: np.ndarray, loglik0: np.ndarray) -> np.ndarray:
    """P-value of the likelihood-ratio test of tau > 0 under the 50:50 mixture of chi2_0 and chi2_1."""
    from scipy import stats

    lrt = np.maximum(2.0 * (loglik - loglik0), 0.0)
    pval = np.where(lrt > 0, 0.5 * stats.chi2.sf(lrt, 1), 1.0)
    return np.where(np.isfinite(loglik), pval, np.nan)


@dataclass
class GeneFits:
    """Per-gene results for the fitted genes (arrays over genes first)."""

    tau: np.ndarray
    sigma2_e: np.ndarray
    loglik: np.ndarray
    loglik0: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    tau_se: np.ndarray
    beta: np.ndarray  #: (genes, p) GLS coefficients of r (add the OLS part for the gene's own)
    Ainv: np.ndarray  #: (genes, p, p)
    resid: np.ndarray  #: (genes, donors) rotated GLS residuals U' D^-1/2 Z'(y - X beta)

    @classmethod
    def empty(cls, G: int, n: int, p: int) -> GeneFits:
        return cls(
            tau=np.empty(G),
            sigma2_e=np.empty(G),
            loglik=np.empty(G),
            loglik0=np.empty(G),
            converged=np.zeros(G, dtype=bool),
            n_iter=np.zeros(G, dtype=np.int64),
            tau_se=np.full(G, np.nan),
            beta=np.empty((G, p)),
            Ainv=np.empty((G, p, p)),
            resid=np.empty((G, n)),
        )

    def put(self, sl: slice, other: GeneFits) -> None:
        """Copy ``other`` (the fits of the genes ``sl``) into place (fields that are None are skipped)."""
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if value is not None:
                getattr(self, name)[sl] = value


#: Genes per chunk: sized so that a chunk's donors x genes arrays stay within a few MB.
CHUNK_ELEMENTS = 1 << 19


def default_chunk_size(n_donors: int) -> int:
    """Genes per chunk for ``n_donors`` donors."""
    return int(max(16, CHUNK_ELEMENTS // max(n_donors, 1)))


class StageTimer:
    """Seconds spent per named stage, summed over calls and threads (for the debug log)."""

    def __init__(self):
        import threading

        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str):
        import time
        from contextlib import contextmanager

        @contextmanager
        def timing():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                with self._lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timing()

    def summary(self) -> str:
        return ", ".join(f"{name} {sec:.2f} s" for name, sec in self.seconds.items())


def fit_chunk(
    problem: RemlProblem,
    Rt: np.ndarray,
    W: np.ndarray,
    *,
    tau: float | None = None,
    timer: StageTimer | None = None,
    out: GeneFits | None = None,
    sl: slice | None = None,
) -> GeneFits | None:
    """Fit the genes of one chunk from their rotated residual donor sums ``Rt`` (genes x donors).

    Returns the fits, or writes them into ``out[sl]`` (and returns None).
    """
    timer = StageTimer() if timer is None else timer
    Rt = np.ascontiguousarray(Rt, dtype=np.float64)  # one compiled variant of the kernels
    G, n = Rt.shape
    fits = GeneFits.empty(G, n, problem.p) if out is None else None
    resid = fits.resid if out is None else out.resid[sl]
    local = GeneFits.empty(G, 0, problem.p)
    rr = W + np.einsum("gn,gn->g", Rt, Rt)
    ll0 = problem._loglik(rr, 0.0)
    if tau is None:
        with timer("grid and search"):
            search(problem, Rt, W, resid, local)
    else:
        with timer("fixed tau"):
            rows = np.arange(G)
            ev = problem.evaluate(np.full(G, float(tau)), rows, Rt, W, Rt @ problem.Xrot, resid)
            local.tau[:] = float(tau)
            local.loglik[:] = ev.loglik
            local.sigma2_e[:] = ev.q / problem.df
            local.beta[:] = ev.beta
            local.Ainv[:] = ev.Ainv
            local.converged[:] = True
    local.loglik = np.where(local.tau == 0, ll0, local.loglik)  # the same number at the boundary, whatever the rounding
    local.loglik0 = ll0
    local.resid = None
    if out is None:
        fits.put(slice(None), local)
        return fits
    out.put(sl, local)
    return None


def fit_genes(
    problem: RemlProblem,
    rotate,
    W: np.ndarray,
    *,
    tau: float | None = None,
    chunk_size: int | None = None,
    progress=None,
    n_threads: int | None = None,
) -> GeneFits:
    """Fit every gene, in chunks of genes; ``rotate(sl)`` returns the rotated residual donor sums of a slice.

    Chunks are fitted by ``n_threads`` concurrent threads (default: the BLAS thread limit in effect), each
    with single-threaded BLAS; every gene's result is the same whatever the thread count or chunk size. The
    distributed counterpart is :func:`._dask.fit_genes_distributed` (the caller chooses).
    """
    G, n, p = len(W), len(problem.lam), problem.p
    if chunk_size is None:
        chunk_size = default_chunk_size(n)
    out = GeneFits.empty(G, n, p)
    slices = [slice(a, min(G, a + chunk_size)) for a in range(0, G, chunk_size)]
    timer = StageTimer()

    def work(sl: slice) -> slice:
        with timer("rotation"):
            Rt = rotate(sl)
        fit_chunk(problem, Rt, W[sl], tau=tau, timer=timer, out=out, sl=sl)
        return sl

    n_workers = min(available_threads() if n_threads is None else max(1, int(n_threads)), len(slices))
    if n_workers <= 1:
        for sl in map(work, slices):
            if progress is not None:
                progress.update(sl.stop - sl.start)
    else:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(n_workers, "snf-reml") as pool:
            for sl in pool.map(work, slices):
                if progress is not None:
                    progress.update(sl.stop - sl.start)
    if G:
        iters = out.n_iter[out.n_iter > 0]
        logg.debug(
            f"    REML: {G} genes in {len(slices)} chunks on {max(n_workers, 1)} thread(s); thread-seconds: "
            f"{timer.summary()}; evaluations per interior gene: median {np.median(iters) if len(iters) else 0:.0f}, "
            f"max {iters.max(initial=0)}"
        )
    return out


class Rotation:
    """``rotate(sl) = (U' T~[:, sl])'``: the rotated residual donor sums of a slice of genes.

    ``T~ = D^-1/2 Z'r`` (donors x genes). A class rather than a closure so the work can be shipped to workers.
    """

    def __init__(self, U: np.ndarray, Tt: np.ndarray):
        self.U = U
        self.Tt = Tt

    def __call__(self, sl: slice) -> np.ndarray:
        return self.Tt[:, sl].T @ self.U
