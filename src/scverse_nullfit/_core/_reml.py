"""Step 4 of the pipeline: exact REML over tau for many genes at once.

Every gene enters through its rotated OLS residual donor sums ``r~`` (donors) and its within-donor sum of
squares ``W``. The search over tau runs in the basis that diagonalises the REML projection as well as ``H``
(see ``docs/model.md``): with ``K`` an orthonormal basis of the complement of ``X``'s columns,

    log|H| + log|X'H^-1 X| = log|K'HK| + log|X'X| = sum_j log(1 + tau mu_j) + log|X'X|
    y'P_H y = r'r - tau sum_j zeta_j^2 / (1 + tau mu_j)

where ``mu, V`` are the eigenpairs of the donor-level ``E = Lam^1/2 (I - X~ (X'X)^-1 X~') Lam^1/2`` (one
eigendecomposition, shared by all genes) and ``zeta = V' Lam^1/2 r~``. Every tau evaluation then costs O(donors)
per gene, independent of the number of covariates; the fixed effects, ``(X'H^-1X)^-1`` and the rotated residuals
are computed once, at each gene's optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scanpy import logging as logg
from scipy import linalg

from ._design import Spectral, eigh_or_error
from ._read import available_threads
from ._suffstats import scaled_cholesky

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


@numba.njit(cache=True, nogil=True)
def _derivative_sums(tau, a, mu, out):  # pragma: no cover - compiled
    """Per gene g: out[g] = (sum a w, sum a w^2, sum a mu w^3, sum mu w, sum mu^2 w^2), w = 1/(1 + tau_g mu)."""
    n = mu.shape[0]
    for g in range(a.shape[0]):
        t = tau[g]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        h1 = 0.0
        h2 = 0.0
        for j in range(n):
            w = 1.0 / (1.0 + t * mu[j])
            aw = a[g, j] * w
            mw = mu[j] * w
            s0 += aw
            s1 += aw * w
            s2 += aw * w * mw
            h1 += mw
            h2 += mw * mw
        out[g, 0] = s0
        out[g, 1] = s1
        out[g, 2] = s2
        out[g, 3] = h1
        out[g, 4] = h2


@numba.njit(cache=True, nogil=True)
def _logdet_sums(tau, mu, out):  # pragma: no cover - compiled
    """Per gene g: out[g] = sum_j log(1 + tau_g mu_j), one log per 8 factors (their product cannot overflow)."""
    n = mu.shape[0]
    for g in range(tau.shape[0]):
        t = tau[g]
        s = 0.0
        j = 0
        while j < n:
            prod = 1.0
            stop = min(n, j + 8)
            big = False
            for k in range(j, stop):
                x = t * mu[k]
                if x > 1e30:
                    big = True
                prod *= 1.0 + x
            if big:  # factors too large to multiply safely: one log each
                for k in range(j, stop):
                    s += np.log1p(t * mu[k])
            else:
                s += np.log(prod)
            j = stop
        out[g] = s


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

        # the restricted spectrum: E = Lam^1/2 (I - X~ (X'X)^-1 X~') Lam^1/2 = V diag(mu) V'
        L, scale = scaled_cholesky(spectral.XtX)  # diag(scale) X'X diag(scale) = L L'
        Qx = linalg.solve_triangular(L, (self.Xrot * scale).T, lower=True, check_finite=False).T  # X~ (X'X)^-1/2
        self.sqrt_lam = np.sqrt(self.lam)
        B = self.sqrt_lam[:, None] * Qx
        E = np.diag(self.lam) - B @ B.T
        mu, V = eigh_or_error((E + E.T) / 2, "the covariate-restricted donor matrix")
        self.mu = np.ascontiguousarray(np.clip(mu, 0.0, None))
        self.V = V
        self.logdet_XtX = 2.0 * (np.log(np.diag(L)).sum() - np.log(scale).sum())
        self._const = self.df * (np.log(2 * np.pi / self.df) + 1.0) + self.logdet_XtX

    # -- per-gene inputs ---------------------------------------------------------------------------------------

    def restricted(self, Rt: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``a = zeta^2`` (genes x donors) and ``r'r`` (genes) from rotated residual sums and within-donor SS."""
        zeta = np.multiply(Rt, self.sqrt_lam) @ self.V
        zeta *= zeta
        rr = W + np.einsum("gn,gn->g", Rt, Rt)
        return zeta, rr

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        p = self.p
        out = np.empty((packed.shape[0], p, p))
        out[:, self._iu[0], self._iu[1]] = packed
        out[:, self._iu[1], self._iu[0]] = packed
        return out

    def _loglik(self, q, logdet):
        return -0.5 * (self.df * np.log(q) + self._const + logdet)

    # -- the REML on (a, rr) -----------------------------------------------------------------------------------

    def grid(self, a: np.ndarray, rr: np.ndarray, taus: np.ndarray = TAU_GRID) -> np.ndarray:
        """REML log-likelihood of every gene at every shared tau: (len(taus), genes)."""
        taus = np.asarray(taus, dtype=np.float64)
        Wt = taus[None, :] / (1.0 + taus[None, :] * self.mu[:, None])  # (donors, taus)
        q = rr[None, :] - (a @ Wt).T
        logdet = np.log1p(taus[:, None] * self.mu[None, :]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._loglik(np.where(q > 0, q, np.nan), logdet[:, None])

    def derivatives(self, tau: np.ndarray, a: np.ndarray, rr: np.ndarray):
        """``q``, the first and second tau-derivatives of the log-likelihood, at a per-gene ``tau``."""
        sums = np.empty((len(tau), 5))
        _derivative_sums(np.ascontiguousarray(tau, dtype=np.float64), a, self.mu, sums)
        s0, s1, s2, h1, h2 = sums.T
        q = rr - tau * s0
        qd = -s1
        qdd = 2.0 * s2
        with np.errstate(invalid="ignore", divide="ignore"):
            r = qd / q
            dl = -0.5 * (self.df * r + h1)
            d2l = -0.5 * (self.df * (qdd / q - r * r) - h2)
        return q, dl, d2l

    def logdet(self, tau: np.ndarray) -> np.ndarray:
        """``log|K'HK| = sum_j log(1 + tau mu_j)`` at a per-gene ``tau``."""
        out = np.empty(len(tau))
        _logdet_sums(np.ascontiguousarray(tau, dtype=np.float64), self.mu, out)
        return out

    def evaluate(
        self,
        tau: np.ndarray,
        Rt: np.ndarray,
        a: np.ndarray,
        rr: np.ndarray,
        *,
        derivs: bool = True,
        out_resid: np.ndarray | None = None,
    ) -> Evaluation:
        """Exact REML quantities at a per-gene ``tau``; with ``derivs`` also the first two tau-derivatives.

        ``a`` and ``rr`` are :meth:`restricted` of ``Rt``. Also the GLS fixed effects of ``r``, ``(X'H^-1X)^-1``
        and the rotated GLS residuals (written into ``out_resid`` when given).
        """
        tau = np.asarray(tau, dtype=np.float64)
        q, dl, d2l = self.derivatives(tau, a, rr)
        loglik = self._loglik(q, self.logdet(tau))
        w = np.multiply.outer(tau, self.lam)
        w += 1.0
        np.reciprocal(w, out=w)  # w = 1 / (1 + tau lam)
        A = self._unpack(w @ self.O)
        A += self.Aw
        w -= 1.0
        w *= Rt
        b = w @ self.Xrot  # X~'((w - 1) r~) = X'H^-1 r
        del w
        Ainv = _spd_inverse(A)
        beta = (Ainv @ b[:, :, None])[:, :, 0]
        resid = np.empty_like(Rt) if out_resid is None else out_resid
        np.matmul(beta, self.Xrot.T, out=resid)
        np.subtract(Rt, resid, out=resid)
        if not derivs:
            dl = d2l = None
        return Evaluation(loglik, dl, d2l, q, beta, Ainv, resid)

    def search(self, a: np.ndarray, rr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Maximise the REML log-likelihood over tau >= 0 for every gene.

        A shared grid brackets each gene's maximum; a safeguarded Newton iteration (bisection when a step
        leaves the bracket or the curvature is not negative) refines it, all genes at once. Inputs are the
        restricted squares ``a`` and ``r'r`` from :meth:`restricted`.

        Returns ``tau``, ``converged`` and ``n_iter``.
        """
        grid = TAU_GRID
        G = a.shape[0]
        ll = self.grid(a, rr, grid)
        best = np.argmax(np.where(np.isfinite(ll), ll, -np.inf), axis=0)
        tau = grid[best].copy()
        lo = grid[np.maximum(best - 1, 0)]
        hi = grid[np.minimum(best + 1, len(grid) - 1)]
        converged = np.zeros(G, dtype=bool)
        n_iter = np.zeros(G, dtype=np.int64)

        # maxima on the grid's ends: a boundary solution when the slope points outwards
        ends = np.flatnonzero((best == 0) | (best == len(grid) - 1))
        if len(ends):
            _, dl, _ = self.derivatives(tau[ends], a[ends], rr[ends])
            at_zero = best[ends] == 0
            outward = np.where(at_zero, dl <= 0, dl >= 0)
            converged[ends[outward]] = True
            start = ends[at_zero & ~outward]
            tau[start] = 0.5 * grid[1]
            lo[start] = 0.0

        active = np.flatnonzero(~converged)
        for it in range(1, MAX_ITER + 1):
            if not len(active):
                break
            t = tau[active]
            _, dl, d2l = self.derivatives(t, a[active], rr[active])
            up = dl > 0
            lo[active] = np.where(up, t, lo[active])
            hi[active] = np.where(up, hi[active], t)
            lo_a, hi_a = lo[active], hi[active]
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = t - dl / d2l
            good = (d2l < 0) & (newton > lo_a) & (newton < hi_a)
            mid = np.where(lo_a > 0, np.sqrt(lo_a * hi_a), 0.5 * (lo_a + hi_a))
            new = np.where(dl == 0, t, np.where(good, newton, mid))  # a zero slope is the answer itself
            done = (np.abs(new - t) <= XTOL * np.maximum(t, 1e-300)) | (hi_a - lo_a <= XTOL * hi_a) | (dl == 0)
            tau[active] = new
            n_iter[active] = it
            converged[active[done]] = True
            active = active[~done]
        return tau, converged, n_iter


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
    with timer("restricted rotation"):
        a, rr = problem.restricted(Rt, W)
    ll0 = problem._loglik(rr, np.zeros(len(rr)))
    with timer("grid and Newton"):
        if tau is None:
            t, conv, it = problem.search(a, rr)
        else:
            t = np.full(len(W), float(tau))
            conv, it = np.ones(len(W), dtype=bool), np.zeros(len(W), dtype=np.int64)
    with timer("fixed effects and projection"):
        out_resid = None if out is None else out.resid[sl]
        ev = problem.evaluate(t, Rt, a, rr, derivs=tau is None, out_resid=out_resid)
    tau_se = np.full(len(W), np.nan)
    if ev.d2loglik is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            tau_se = np.where(ev.d2loglik < 0, np.sqrt(-1.0 / ev.d2loglik), np.nan)
    loglik = np.where(t == 0, ll0, ev.loglik)  # the same number at the boundary, whatever the rounding
    fits = GeneFits(
        tau=t,
        sigma2_e=ev.q / problem.df,
        loglik=loglik,
        loglik0=ll0,
        converged=conv,
        n_iter=it,
        tau_se=tau_se,
        beta=ev.beta,
        Ainv=ev.Ainv,
        resid=ev.resid,
    )
    if out is None:
        return fits
    fits.resid = None  # already in place
    out.put(sl, fits)
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
            f"{timer.summary()}; Newton iterations median {np.median(iters) if len(iters) else 0:.0f}, "
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
