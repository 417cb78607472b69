"""Step 4 of the pipeline: exact REML over tau for many genes at once.

Every gene enters through its rotated OLS residual donor sums ``r~`` (donors) and its within-donor sum of
squares ``W``; every tau evaluation is a handful of GEMMs over a chunk of genes (see ``docs/model.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._design import Spectral

#: The shared tau grid: the boundary 0, then 3 points per decade over [1e-6, 1e6].
TAU_GRID = np.concatenate([[0.0], np.logspace(-6, 6, 37)])
#: Relative step in tau at which the Newton search stops.
XTOL = 1e-10
MAX_ITER = 100


@dataclass
class Evaluation:
    """REML quantities at one tau per gene (arrays over genes first)."""

    loglik: np.ndarray
    dloglik: np.ndarray | None
    d2loglik: np.ndarray | None
    q: np.ndarray  #: r'P_H r
    beta: np.ndarray  #: (genes, p) GLS coefficients of r
    Ainv: np.ndarray  #: (genes, p, p) (X'H^-1 X)^-1
    resid: np.ndarray  #: (genes, donors) rotated GLS residual donor sums


class RemlProblem:
    """The parts of the REML shared by all genes, with vectorised evaluation and search."""

    def __init__(self, spectral: Spectral):
        self.lam = spectral.lam
        self.Xrot = spectral.Xrot
        self.Aw = spectral.Aw
        self.N = spectral.n_cells
        self.p = spectral.Xrot.shape[1]
        self.df = self.N - self.p
        if self.df <= 0:
            raise ValueError(f"the design has {self.p} columns but there are only {self.N} cells.")
        p = self.p
        self._iu = np.triu_indices(p)
        # packed outer products x~_k x~_k' (upper triangle), so all genes' X'H^-1X come from one GEMM
        self.O = self.Xrot[:, self._iu[0]] * self.Xrot[:, self._iu[1]]
        self._const = self.df * (np.log(2 * np.pi / self.df) + 1.0)

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        p = self.p
        out = np.empty((packed.shape[0], p, p))
        out[:, self._iu[0], self._iu[1]] = packed
        out[:, self._iu[1], self._iu[0]] = packed
        return out

    def _loglik(self, q, logdetH, logdetA):
        return -0.5 * (self.df * np.log(q) + self._const + logdetH + logdetA)

    def grid(self, Rt: np.ndarray, W: np.ndarray, taus: np.ndarray = TAU_GRID) -> np.ndarray:
        """REML log-likelihood of every gene at every shared tau: (len(taus), genes)."""
        R2 = Rt * Rt
        out = np.empty((len(taus), Rt.shape[0]))
        for i, tau in enumerate(taus):
            w = 1.0 / (1.0 + tau * self.lam)
            A = self.Aw + (self.Xrot * w[:, None]).T @ self.Xrot
            L = np.linalg.cholesky(A)
            logdetA = 2.0 * np.log(np.diag(L)).sum()
            B = Rt @ (self.Xrot * (-tau * self.lam * w)[:, None])  # (genes, p): X~'((w-1) r~)
            Z = np.linalg.solve(L, B.T)
            q = W + R2 @ w - np.einsum("pg,pg->g", Z, Z)
            out[i] = self._loglik(q, np.log1p(tau * self.lam).sum(), logdetA)
        return out

    def evaluate(self, tau: np.ndarray, Rt: np.ndarray, W: np.ndarray, *, derivs: bool = True) -> Evaluation:
        """Exact REML quantities at a per-gene ``tau``; with ``derivs`` also the first two tau-derivatives."""
        lam = self.lam
        tl = tau[:, None] * lam[None, :]
        w = 1.0 / (1.0 + tl)
        A = self._unpack(w @ self.O) + self.Aw
        b = (-tl * w * Rt) @ self.Xrot
        Ainv = np.linalg.inv(A)
        logdetA = np.linalg.slogdet(A)[1]
        beta = np.einsum("gij,gj->gi", Ainv, b)
        resid = Rt - beta @ self.Xrot.T
        q = W + np.einsum("gn,gn->g", w * Rt, Rt) - np.einsum("gi,gi->g", b, beta)
        loglik = self._loglik(q, np.log1p(tl).sum(axis=1), logdetA)
        if not derivs:
            return Evaluation(loglik, None, None, q, beta, Ainv, resid)

        lw = lam[None, :] * w
        wd = -lw * w
        wdd = -2.0 * lw * wd
        Ad = self._unpack(wd @ self.O)
        Add = self._unpack(wdd @ self.O)
        bd = (wd * Rt) @ self.Xrot
        e2 = resid * resid
        qd = np.einsum("gn,gn->g", wd, e2)
        u = bd - np.einsum("gij,gj->gi", Ad, beta)
        qdd = np.einsum("gn,gn->g", wdd, e2) - 2.0 * np.einsum("gi,gij,gj->g", u, Ainv, u)
        K = Ainv @ Ad
        tr1 = np.trace(K, axis1=1, axis2=2)
        tr2 = np.einsum("gij,gji->g", Ainv, Add) - np.einsum("gij,gji->g", K, K)
        dH = lw.sum(axis=1)
        d2H = -(lw * lw).sum(axis=1)
        r = qd / q
        dl = -0.5 * (self.df * r + dH + tr1)
        d2l = -0.5 * (self.df * (qdd / q - r * r) + d2H + tr2)
        return Evaluation(loglik, dl, d2l, q, beta, Ainv, resid)

    def search(self, Rt: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Maximise the REML log-likelihood over tau >= 0 for every gene.

        A shared grid brackets each gene's maximum; a safeguarded Newton iteration (bisection when a step
        leaves the bracket or the curvature is not negative) refines it, all genes at once.

        Returns ``tau``, ``converged``, ``n_iter`` and the log-likelihood at tau = 0.
        """
        grid = TAU_GRID
        G = Rt.shape[0]
        ll = self.grid(Rt, W, grid)
        best = np.argmax(np.where(np.isfinite(ll), ll, -np.inf), axis=0)
        tau = grid[best].copy()
        lo = grid[np.maximum(best - 1, 0)]
        hi = grid[np.minimum(best + 1, len(grid) - 1)]
        converged = np.zeros(G, dtype=bool)
        n_iter = np.zeros(G, dtype=np.int64)

        # maxima on the grid's ends: a boundary solution when the slope points outwards
        ends = np.flatnonzero((best == 0) | (best == len(grid) - 1))
        if len(ends):
            ev = self.evaluate(tau[ends], Rt[ends], W[ends])
            at_zero = best[ends] == 0
            outward = np.where(at_zero, ev.dloglik <= 0, ev.dloglik >= 0)
            converged[ends[outward]] = True
            start = ends[at_zero & ~outward]
            tau[start] = 0.5 * grid[1]
            lo[start] = 0.0

        active = np.flatnonzero(~converged)
        for it in range(1, MAX_ITER + 1):
            if not len(active):
                break
            t = tau[active]
            ev = self.evaluate(t, Rt[active], W[active])
            dl, d2l = ev.dloglik, ev.d2loglik
            up = dl > 0
            lo[active] = np.where(up, t, lo[active])
            hi[active] = np.where(up, hi[active], t)
            a, b = lo[active], hi[active]
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = t - dl / d2l
            good = (d2l < 0) & (newton > a) & (newton < b)
            mid = np.where(a > 0, np.sqrt(a * b), 0.5 * (a + b))
            new = np.where(good, newton, mid)
            done = (np.abs(new - t) <= XTOL * np.maximum(t, 1e-300)) | (b - a <= XTOL * b) | (dl == 0)
            tau[active] = new
            n_iter[active] = it
            converged[active[done]] = True
            active = active[~done]
        return tau, converged, n_iter, ll[0]


def h2_pvalue(loglik: np.ndarray, loglik0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Likelihood-ratio statistic of tau > 0 and its p-value under the 50:50 mixture of chi2_0 and chi2_1."""
    from scipy import stats

    lrt = np.maximum(2.0 * (loglik - loglik0), 0.0)
    pval = np.where(lrt > 0, 0.5 * stats.chi2.sf(lrt, 1), 1.0)
    return lrt, np.where(np.isfinite(loglik), pval, np.nan)


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


def fit_genes(
    problem: RemlProblem,
    rotate,
    W: np.ndarray,
    *,
    tau: float | None = None,
    chunk_size: int | None = None,
    progress=None,
) -> GeneFits:
    """Fit every gene, in chunks of genes; ``rotate(sl)`` returns the rotated residual donor sums of a slice."""
    G, n, p = len(W), len(problem.lam), problem.p
    if chunk_size is None:
        chunk_size = int(max(64, (1 << 21) // max(n, 1)))
    out = GeneFits(
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
    for start in range(0, G, chunk_size):
        sl = slice(start, min(G, start + chunk_size))
        Rt, Wc = rotate(sl), W[sl]
        if tau is None:
            t, conv, it, ll0 = problem.search(Rt, Wc)
        else:
            t = np.full(len(Wc), float(tau))
            conv, it = np.ones(len(Wc), dtype=bool), np.zeros(len(Wc), dtype=np.int64)
            ll0 = problem.evaluate(np.zeros(len(Wc)), Rt, Wc, derivs=False).loglik
        ev = problem.evaluate(t, Rt, Wc, derivs=tau is None)
        out.tau[sl], out.converged[sl], out.n_iter[sl], out.loglik0[sl] = t, conv, it, ll0
        out.loglik[sl] = ev.loglik
        out.sigma2_e[sl] = ev.q / problem.df
        if ev.d2loglik is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                out.tau_se[sl] = np.where(ev.d2loglik < 0, np.sqrt(-1.0 / ev.d2loglik), np.nan)
        out.beta[sl], out.Ainv[sl], out.resid[sl] = ev.beta, ev.Ainv, ev.resid
        if progress is not None:
            progress.update(sl.stop - sl.start)
    return out
