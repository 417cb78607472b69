"""Step 4 of the pipeline: exact REML over tau for many genes at once.

Every gene enters through its rotated OLS residual donor sums ``r~`` (donors) and its within-donor sum of
squares ``W``; with ``w_j = 1/(1 + tau lam_j)`` (see ``docs/model.md``)

    y'P_H y = W + sum_j w_j r~_j^2 - b'A^-1 b,    A = X'H^-1X = A_w + X~' diag(w) X~,    b = X~'((w - 1) r~)
    log|H| + log|X'H^-1 X| = sum_j log(1 + tau lam_j) + log|A|

(one eigendecomposition, shared by all genes; no restricted eigenvalues). The parts that depend on tau only
(``X~' diag(lam^a w^(a+1)) X~``, ``log|A|`` and ``A^-1``) come from Taylor expansions at geometric nodes in tau,
shared by all genes; the per-gene part of an evaluation at a per-gene tau is one pass over the gene's donors
(weights and four weighted copies of ``r~``) and one narrow GEMM with ``X~``. The shared grid is one GEMM for all
genes (through a low-rank factor of its matrix). No second rotation of the genes is needed, and nothing is
compiled.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, fields

import numpy as np
from scanpy import logging as logg
from scipy import linalg
from scipy.special import comb

from ._design import Spectral
from ._read import available_threads
from ._suffstats import scaled_cholesky

#: The shared tau grid: the boundary 0, then 2 points per decade over [1e-6, 1e6].
TAU_GRID = np.concatenate([[0.0], np.logspace(-6, 6, 25)])
#: Relative step in tau at which the search stops (the evaluated tau is the answer).
XTOL = 1e-10
#: A Newton step below this relative size lands within about its square of the maximum: the search stops there.
NEAR = 1e-5
MAX_ITER = 100
#: A Halley step below this relative size lands within about its cube of the maximum: the search stops there, and the
#: results at its end point follow from the derivatives at its start (errors of about its cube, relative).
NEAR2 = 1e-3
#: Expansion nodes of the functions of tau: ``2 ** (i / NODES_PER_OCTAVE)``, so that ``|tau / node - 1| < 0.022``.
NODES_PER_OCTAVE = 16
#: Terms of each Taylor expansion: relative remainders below ``C(9, a) 0.022**(10 - a)``, i.e. 3e-17, 1e-14, 2e-12
#: and 2e-10 for ``A`` and its first three derivatives (the second and third only steer the steps and, multiplied by
#: the last step's square and cube, move the results to its end point).
TAYLOR_TERMS = 10
#: The nodes kept in a table (tau from about 6e-11 to 1.7e7); a tau outside is evaluated directly.
NODE_RANGE = (-34 * NODES_PER_OCTAVE, 24 * NODES_PER_OCTAVE)
#: The shared grid's products keep the singular values of its matrix down to this fraction of the largest (what is
#: dropped moves ``b'A^-1b`` by about 1e-16 of ``q``; the grid only brackets each gene's maximum).
GRID_RANK_RTOL = 1e-14
#: Genes x donors elements per block of the per-gene pass: its few arrays stay in a core's L2 cache.
BLOCK_ELEMENTS = 1 << 15

_K = TAYLOR_TERMS
_ORDERS = np.arange(4)[:, None]
_TERMS = np.arange(_K)[None, :]
#: Coefficient of term k in the a-th derivative's expansion (``C(k, a)``, 0 for k < a) and the power of ``-x`` it takes.
_M_BINOM = comb(_TERMS, _ORDERS)
_M_POWER = np.maximum(_TERMS - _ORDERS, 0)
#: ``h_a`` (a = 1, 2, 3): term k takes ``C(k + a - 1, a - 1) (-x)^k P_{k + a}``.
_H_BINOM = comb(_TERMS + _ORDERS[1:] - 1, _ORDERS[1:] - 1)


class TauFunctions:
    """The gene-independent functions of tau, at a per-gene tau.

    ``M_a = X~' diag(lam^a w^(a+1)) X~`` (a = 0..3; ``M_0 = A - A_w``, ``M_a`` the a-th derivative of ``M_0`` over
    ``(-1)^a a!``), the restricted log-determinant ``log|H| + log|A| - log|X'X|`` and its derivatives ``h_a`` (a =
    1..3; ``h_1`` the first, ``-h_2`` the second, ``2 h_3`` the third). At a node ``c``, ``1/(1 + tau lam) = w_c /
    (1 + x u)`` with ``x = tau / c - 1``, ``u = c lam w_c`` in [0, 1), so ``A`` is a power series in ``x`` and so is
    ``log|A|`` (from the series of ``A`` by the recursion of a matrix inverse); their coefficients are computed once
    per node (an octave of nodes at a time, when first needed) and shared by all genes. A tau outside the nodes' range
    (or 0) is evaluated directly.
    """

    def __init__(self, lam: np.ndarray, Xrot: np.ndarray, Aw: np.ndarray, XtX: np.ndarray):
        self.lam, self.Xrot, self.Aw, self.XtX = lam, Xrot, Aw, XtX
        p = Xrot.shape[1]
        self.p = p
        L, scale = scaled_cholesky(XtX)
        self.logdet_XtX = 2.0 * (np.log(np.diag(L)).sum() - np.log(scale).sum())
        self._C = linalg.solve_triangular(L, np.diag(scale), lower=True, check_finite=False)  # C X'X C' = I
        self._iu = np.triu_indices(p)
        self._Op = np.ascontiguousarray(Xrot[:, self._iu[0]] * Xrot[:, self._iu[1]])  # x~_j x~_j', upper triangle
        n_nodes = -(-(NODE_RANGE[1] - NODE_RANGE[0] + 1) // NODES_PER_OCTAVE) * NODES_PER_OCTAVE  # whole octaves
        self._T = np.zeros((n_nodes, _K, p * p))  # sum_j w_cj u_cj^k x~_j x~_j'
        self._Ai = np.zeros((n_nodes, _K, p * p))  # the coefficients of (-x)^k in A^-1
        self._regular = np.zeros(n_nodes, dtype=bool)  # A_c not numerically singular: the series of A^-1 holds
        self._L = np.zeros(n_nodes)  # the restricted log-determinant at c
        self._P = np.zeros((n_nodes, _K + 3))  # minus k times its coefficient of (-x)^k (sum_j v_cj^k, v = c mu w)
        self._built = np.zeros(n_nodes, dtype=bool)
        self._lock = threading.Lock()

    def __getstate__(self):  # shipped to dask workers without the tables (rebuilt there when needed)
        return {"lam": self.lam, "Xrot": self.Xrot, "Aw": self.Aw, "XtX": self.XtX}

    def __setstate__(self, state):
        self.__init__(state["lam"], state["Xrot"], state["Aw"], state["XtX"])

    def _sums(self, weights: np.ndarray) -> np.ndarray:
        """``X~' diag(v) X~`` (p x p) for each row ``v`` of ``weights`` (..., donors): one product with the packed
        outer products, unpacked."""
        packed = weights.reshape(-1, weights.shape[-1]) @ self._Op
        out = np.empty((*weights.shape[:-1], self.p, self.p))
        out[..., self._iu[0], self._iu[1]] = packed.reshape(*weights.shape[:-1], -1)
        out[..., self._iu[1], self._iu[0]] = packed.reshape(*weights.shape[:-1], -1)
        return out

    def _log_det_ratio(self, tau: np.ndarray, logdet_A: np.ndarray, N: np.ndarray | None = None) -> np.ndarray:
        """``log|A| - log|X'X|`` at each tau, given ``log|A|``: where ``tau max(lam) <= 1`` from the eigenvalues ``s``
        (in [0, 1/2]) of ``C N C'``, ``N = X~' diag(1 - w) X~`` (computed here unless given), as ``sum log(1 - s)``,
        which keeps its digits when ``A`` is close to ``X'X``."""
        out = logdet_A - self.logdet_XtX
        small = np.flatnonzero(tau * self.lam.max(initial=0.0) <= 1.0)
        if len(small):
            if N is None:
                lw = tau[small, None] * self.lam[None, :]
                N = self._sums(lw / (1.0 + lw))
            else:
                N = N[small]
            S = self._C @ N @ self._C.T
            out[small] = np.log1p(-np.linalg.eigvalsh((S + np.swapaxes(S, 1, 2)) / 2)).sum(axis=1)
        return out

    def _build(self, idx: np.ndarray) -> None:
        """Build the tables of the nodes ``idx`` and of the rest of their octaves: an octave is built whole, by one
        product over the donors, so every node's table is the same whichever were needed first."""
        octaves = np.unique(idx // NODES_PER_OCTAVE)
        octaves = octaves[~self._built[octaves * NODES_PER_OCTAVE]]
        if not len(octaves):
            return
        with self._lock:
            octaves = octaves[~self._built[octaves * NODES_PER_OCTAVE]]
            if not len(octaves):
                return
            for octave in octaves:
                self._build_nodes(np.arange(octave * NODES_PER_OCTAVE, (octave + 1) * NODES_PER_OCTAVE))

    def _build_nodes(self, missing: np.ndarray) -> None:
        """The tables of the nodes ``missing`` (one product over the donors for all)."""
        m, p, terms = len(missing), self.p, _K + 3
        c = np.exp2((missing + NODE_RANGE[0]) / NODES_PER_OCTAVE)
        w = 1.0 / (1.0 + c[:, None] * self.lam[None, :])
        u = c[:, None] * self.lam[None, :] * w  # = 1 - w
        V = np.empty((m, terms + 1, len(self.lam)))  # w u^k (k < terms), then u
        V[:, 0] = w
        for k in range(1, terms):
            np.multiply(V[:, k - 1], u, out=V[:, k])
        V[:, terms] = u
        T = self._sums(V)
        self._T[missing] = T[:, :_K].reshape(m, _K, p * p)
        # A = A_c + sum_k (-x)^k T_k; with B_k = A_c^-1 T_k and R_k the coefficients of (I + sum_k (-x)^k B_k)^-1,
        # the coefficient of (-x)^k in log|A| is alpha_k = sum_(i <= k) i tr(R_(k-i) B_i) / k
        eye = np.broadcast_to(np.eye(p), (m, 1, p, p))
        logdet_A, B, regular = _logdet_and_solve(T[:, 0] + self.Aw, np.concatenate([T[:, 1:terms], eye], axis=1))
        Ac_inv = B[:, -1]
        B = np.moveaxis(B[:, :-1], 1, 0)  # (terms - 1, m, p, p): B_1, B_2, ...
        iB = B * np.arange(1, terms)[:, None, None, None]
        R = np.empty((terms, m, p, p))
        R[0] = np.eye(p)
        k_alpha = np.zeros((m, terms))
        for k in range(1, terms):
            back = R[k - 1 :: -1]  # R_(k-1), ..., R_0
            k_alpha[:, k] = np.einsum("imab,imba->m", back, iB[:k])
            R[k] = -np.matmul(B[:k], back).sum(axis=0)
        # A^-1 = (I + sum_k (-x)^k B_k)^-1 A_c^-1 = sum_k (-x)^k R_k A_c^-1
        self._Ai[missing] = np.moveaxis(np.matmul(R[:_K], Ac_inv), 0, 1).reshape(m, _K, p * p)
        self._regular[missing] = regular
        P = np.empty((m, terms))
        vk = np.ones_like(u)
        for k in range(terms):
            P[:, k] = vk.sum(axis=1) - k_alpha[:, k]
            vk *= u
        self._P[missing] = P
        ratio = self._log_det_ratio(c, logdet_A, T[:, terms])
        self._L[missing] = np.log1p(c[:, None] * self.lam[None, :]).sum(axis=1) + ratio
        self._built[missing] = True

    def at(self, tau: np.ndarray, matrices: bool = True) -> tuple[np.ndarray | None, ...]:
        """``M`` (genes, 4, p, p), the restricted log-determinant (genes), ``h`` (genes, 3) and ``A^-1`` (genes, p, p)
        at a per-gene tau (the matrices None unless ``matrices``)."""
        m, p = len(tau), self.p
        M = np.empty((m, 4, p * p))
        Ainv = np.empty((m, p * p))
        logdet = np.empty(m)
        h = np.empty((m, 3))
        with np.errstate(divide="ignore", invalid="ignore"):
            node = np.rint(np.log2(tau) * NODES_PER_OCTAVE)
        inside = (tau > 0) & (node >= NODE_RANGE[0]) & (node <= NODE_RANGE[1])
        if inside.any():
            idx = node[inside].astype(np.int64) - NODE_RANGE[0]
            self._build(np.unique(idx))
            if matrices and not self._regular[idx].all():  # a singular A at a node: those genes directly
                inside[np.flatnonzero(inside)[~self._regular[idx]]] = False
                idx = idx[self._regular[idx]]
            c = np.exp2((idx + NODE_RANGE[0]) / NODES_PER_OCTAVE)
            powers = np.empty((len(c), _K + 1))  # (-x)^k
            powers[:, 0] = 1.0
            powers[:, 1:] = (1.0 - tau[inside] / c)[:, None]
            np.cumprod(powers, axis=1, out=powers)
            inv_c = (1.0 / c)[:, None] ** np.arange(4)[None, :]
            coef = _M_BINOM[None] * powers[:, _M_POWER] * inv_c[:, :, None]  # (genes, a, k)
            if matrices:
                M[inside] = np.matmul(coef, self._T[idx])
                Ainv[inside] = np.matmul(powers[:, None, :_K], self._Ai[idx])[:, 0]
            P = self._P[idx]
            logdet[inside] = self._L[idx] - (powers[:, 1:] / np.arange(1, _K + 1) * P[:, 1 : _K + 1]).sum(axis=1)
            for a in (1, 2, 3):
                h[inside, a - 1] = inv_c[:, a] * (_H_BINOM[a - 1] * powers[:, :_K] * P[:, a : a + _K]).sum(axis=1)
        M = M.reshape(m, 4, p, p)
        Ainv = Ainv.reshape(m, p, p)
        if matrices:
            Ainv += np.swapaxes(Ainv, 1, 2)
            Ainv *= 0.5
        out = np.flatnonzero(~inside)
        if len(out):
            M[out], logdet[out], h[out] = self.direct(tau[out])
            if matrices:
                Ainv[out] = _spd_inverse(M[out, 0] + self.Aw)
        return (M, logdet, h, Ainv) if matrices else (None, logdet, h, None)

    def direct(self, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`at` by direct sums over the donors (for a few values of tau)."""
        t = np.asarray(tau, dtype=np.float64)[:, None]
        w = 1.0 / (1.0 + t * self.lam[None, :])
        weights = np.empty((len(t), 4, len(self.lam)))
        weights[:, 0] = w
        for a in (1, 2, 3):
            np.multiply(weights[:, a - 1], self.lam * w, out=weights[:, a])
        M = self._sums(weights)
        logdet_A, S, _ = _logdet_and_solve(M[:, 0] + self.Aw, M[:, 1:])  # S_a = A^-1 M_a
        logdet = np.log1p(t * self.lam[None, :]).sum(axis=1) + self._log_det_ratio(t[:, 0], logdet_A)
        lw = weights[:, 1] / weights[:, 0]  # lam w
        S1, S2, S3 = S[:, 0], S[:, 1], S[:, 2]
        S11 = S1 @ S1
        tr1, tr2, tr3 = (np.trace(Sa, axis1=1, axis2=2) for Sa in (S1, S2, S3))
        h = np.stack([(lw**a).sum(axis=1) for a in (1, 2, 3)], axis=1)  # the derivatives of sum_j log(1 + tau lam_j)
        h[:, 0] -= tr1  # and those of log|A|: A' = -M_1, M_a' = -(a + 1) M_(a+1)
        h[:, 1] += np.trace(S11, axis1=1, axis2=2) - 2.0 * tr2
        h[:, 2] += -_trace_of_product(S11, S1) + 3.0 * _trace_of_product(S1, S2) - 3.0 * tr3
        return M, logdet, h


def _trace_of_product(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``tr(A B)`` for stacks of square matrices."""
    return np.einsum("...ij,...ji->...", A, B)


def _logdet_and_solve(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log|A|``, ``A^-1 B_k`` and whether ``A`` is regular, for a stack of symmetric positive definite ``A`` (m,
    p, p) and ``B`` (m, k, p, p), after scaling ``A`` to a unit diagonal (covariates on different scales lose no
    digits); the log pseudo-determinant and the pseudo-inverse where ``A`` is numerically singular."""
    d = np.sqrt(np.abs(np.diagonal(A, axis1=-2, axis2=-1)))
    scale = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 1.0)
    As = A * scale[:, :, None] * scale[:, None, :]
    try:
        sign, logdet = np.linalg.slogdet(As)
        Asinv = np.linalg.inv(As) if np.all(sign > 0) else None
    except np.linalg.LinAlgError:
        Asinv = None
    regular = np.full(len(A), Asinv is not None)
    if Asinv is None:
        s, Q = np.linalg.eigh(As)
        top = np.max(np.abs(s), axis=-1, keepdims=True)
        keep = s > top * A.shape[-1] * np.finfo(float).eps
        regular = keep.all(axis=-1)
        logdet = np.where(keep, np.log(np.where(keep, s, 1.0)), 0.0).sum(axis=-1)
        Asinv = (Q * np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)[..., None, :]) @ np.swapaxes(Q, -1, -2)
    Ainv = Asinv * scale[:, :, None] * scale[:, None, :]
    return logdet - 2.0 * np.log(scale).sum(axis=-1), Ainv[:, None] @ B, regular


@dataclass
class Evaluation:
    """REML quantities at one tau per gene (arrays over genes first)."""

    loglik: np.ndarray
    dloglik: np.ndarray
    d2loglik: np.ndarray
    q: np.ndarray  #: r'P_H r
    beta: np.ndarray  #: (genes, p) GLS coefficients of r
    Ainv: np.ndarray  #: (genes, p, p) (X'H^-1 X)^-1
    d3loglik: np.ndarray | None = None
    #: The tau-derivatives of q and of beta (``-gamma``, ``beta2``) and ``M_1``, ``M_2``: what :meth:`moved` needs.
    dq: np.ndarray | None = None
    d2q: np.ndarray | None = None
    d3q: np.ndarray | None = None
    gamma: np.ndarray | None = None
    beta2: np.ndarray | None = None
    M1: np.ndarray | None = None
    M2: np.ndarray | None = None

    def take(self, sel) -> Evaluation:
        """The evaluation of the genes ``sel``."""
        return Evaluation(**{f.name: None if (v := getattr(self, f.name)) is None else v[sel] for f in fields(self)})

    def moved(self, sel, delta: np.ndarray, problem: RemlProblem, tau: np.ndarray) -> Evaluation:
        """The genes ``sel`` at ``tau + delta`` (``tau`` the evaluated one), from the derivatives at ``tau``: q to third
        order, beta and ``(X'H^-1X)^-1`` to second, the curvature to first; the log-likelihood from q exactly.

        For a step ``|delta| <= NEAR2 tau`` the error is below about ``(delta / tau)^3`` relative.
        """
        d = delta[:, None]
        Ainv, M1, M2 = self.Ainv[sel], self.M1[sel], self.M2[sel]
        beta = self.beta[sel] - self.gamma[sel] * d + 0.5 * self.beta2[sel] * d * d
        P1 = Ainv @ M1  # A^-1 M_1
        dA = P1 @ Ainv
        d2A = P1 @ dA - Ainv @ M2 @ Ainv  # half the second derivative of A^-1
        Ainv2 = Ainv + dA * d[:, :, None] + d2A * (d * d)[:, :, None]
        Ainv2 = 0.5 * (Ainv2 + np.swapaxes(Ainv2, 1, 2))
        q = self.q[sel] + delta * (self.dq[sel] + delta * (0.5 * self.d2q[sel] + delta * self.d3q[sel] / 6.0))
        _, logdet, _, _ = problem.functions.at(tau + delta, matrices=False)
        with np.errstate(invalid="ignore", divide="ignore"):
            loglik = problem._loglik(np.where(q > 0, q, np.nan), logdet)
        d2l = self.d2loglik[sel] + self.d3loglik[sel] * delta
        return Evaluation(loglik, np.zeros_like(delta), d2l, q, beta, Ainv2)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("gk,gk->g", a, b)


def _matvec(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.matmul(M, v[:, :, None])[:, :, 0]


class RemlProblem:
    """The parts of the REML shared by all genes, with vectorised evaluation and search."""

    def __init__(self, spectral: Spectral):
        self.lam = np.ascontiguousarray(spectral.lam)
        self.Xrot = np.ascontiguousarray(spectral.Xrot)
        self.XT = np.ascontiguousarray(self.Xrot.T)
        self.Aw = spectral.Aw
        self.N = spectral.n_cells
        self.p = spectral.Xrot.shape[1]
        self.df = self.N - self.p
        if self.df <= 0:
            raise ValueError(f"the design has {self.p} columns but there are only {self.N} cells.")
        self.functions = TauFunctions(self.lam, self.Xrot, self.Aw, spectral.XtX)
        self.logdet_XtX = self.functions.logdet_XtX
        self._const = self.df * (np.log(2 * np.pi / self.df) + 1.0) + self.logdet_XtX
        self._grid_setup(TAU_GRID)

    def _grid_setup(self, taus: np.ndarray) -> None:
        """Per grid point: the weights w, and M_t with b'A^-1b = ||r~' M_t||^2 (the same for every gene)."""
        self.grid_taus = np.asarray(taus, dtype=np.float64)
        positive = self.grid_taus > 0
        w = 1.0 / (1.0 + self.grid_taus[positive][None, :] * self.lam[:, None])  # (donors, taus)
        self._grid_functions = self._functions_at(self.grid_taus)
        M0, logdet = self._grid_functions[0][positive, 0], self._grid_functions[1][positive]
        K = _inverse_factor(M0 + self.Aw)  # A_t^-1 = K_t K_t'
        f = 1.0 - w
        M = np.einsum("jk,jt,tkl->jtl", self.Xrot, f, K).reshape(len(self.lam), -1)
        self._grid_w = np.ascontiguousarray(w)
        # M's columns (f_t times the covariates, all t) span few dimensions: M = Q S with Q orthonormal (donors x
        # rank), the singular values kept down to GRID_RANK_RTOL of the largest, so Rt M = (Rt Q) S costs rank columns
        Q, sv, Vt = np.linalg.svd(M, full_matrices=False)
        rank = int(np.sum(sv > GRID_RANK_RTOL * sv[:1]))
        self._grid_QX = np.ascontiguousarray(np.hstack([Q[:, :rank], self.Xrot]))  # and X~: Rt X~ in the same product
        self._grid_S = np.ascontiguousarray(sv[:rank, None] * Vt[:rank])
        self._grid_logdet = logdet
        self._weights_cache = {}

    def __getstate__(self):  # shipped to dask workers without the grid's weights (recomputed there when needed)
        return {**self.__dict__, "_weights_cache": {}}

    def _loglik(self, q, logdet):
        return -0.5 * (self.df * np.log(q) + self._const + logdet)

    # -- the REML on (r~, W) -----------------------------------------------------------------------------------

    def grid(self, Rt: np.ndarray, W: np.ndarray, R2: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """REML log-likelihood of every gene at every grid tau (len(grid), genes), and ``Rt X~``. ``R2 = Rt**2`` if
        already computed."""
        G = Rt.shape[0]
        T = len(self._grid_logdet)
        out = np.empty((T + 1, G))
        R2 = Rt * Rt if R2 is None else R2
        q0 = W + R2.sum(axis=1)
        q = (R2 @ self._grid_w).T  # (taus, genes)
        q += W
        QX = Rt @ self._grid_QX
        XR = np.ascontiguousarray(QX[:, -self.p :])
        B = (QX[:, : -self.p] @ self._grid_S).reshape(G, T, self.p)
        q -= np.einsum("gtk,gtk->tg", B, B)
        del B
        with np.errstate(invalid="ignore", divide="ignore"):
            out[0] = self._loglik(np.where(q0 > 0, q0, np.nan), 0.0)
            out[1:] = self._loglik(np.where(q > 0, q, np.nan), self._grid_logdet[:, None])
        return out, XR

    def evaluate_shared(self, taus: np.ndarray, which: np.ndarray, Rt: np.ndarray, W: np.ndarray, XR: np.ndarray,
                        R2: np.ndarray | None = None) -> Evaluation:  # fmt: skip
        """Exact REML quantities of every gene of ``Rt`` at ``taus[which]``, a few distinct values (the grid, or a fixed
        tau): within each group of genes at the same tau the weights are shared, so the per-gene sums are GEMMs and
        ``A^-1`` is one inverse. ``R2 = Rt**2`` if already computed."""
        G, p = Rt.shape[0], self.p
        taus = np.asarray(taus, dtype=np.float64)
        grid = taus is self.grid_taus
        R2 = Rt * Rt if R2 is None else R2
        s = np.empty((4, G))
        u = np.empty((4, G, p))
        M, logdet, h, Ainv = self._grid_functions if grid else self._functions_at(taus)
        for t in np.unique(which):
            sel = np.flatnonzero(which == t)
            omega, XW = self._shared_weights(taus[t], t if grid else None)
            rows = slice(sel[0], sel[-1] + 1) if len(sel) == sel[-1] - sel[0] + 1 else sel
            s[:, sel] = omega @ R2[rows].T
            u[:, sel] = (XW @ Rt[rows].T).reshape(4, p, len(sel)).transpose(0, 2, 1)
            if taus[t] == 0:
                u[0, sel] = XR[sel]  # b = 0 exactly: the GLS fit of r at tau = 0 is the OLS one
        return self._combine(s, u, XR, W, M[which], Ainv[which], logdet[which], h[which])

    def _functions_at(self, taus: np.ndarray) -> tuple[np.ndarray, ...]:
        """``M``, the log-determinant, ``h`` and ``A^-1`` at a few values of tau, directly."""
        M, logdet, h = self.functions.direct(taus)
        return M, logdet, h, _spd_inverse(M[:, 0] + self.Aw)

    def _shared_weights(self, tau: float, key: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``omega_a = lam^a w^(a+1)`` (4, donors) at one tau, and the rows ``omega_a x~_k`` (4 p, donors); the grid's
        are kept once computed."""
        if key is not None and key in self._weights_cache:
            return self._weights_cache[key]
        omega = np.empty((4, len(self.lam)))
        omega[0] = 1.0 / (1.0 + tau * self.lam)
        for k in (1, 2, 3):
            omega[k] = omega[k - 1] * self.lam * omega[0]
        XW = (omega[:, None, :] * self.XT[None, :, :]).reshape(4 * self.p, -1)
        if key is not None:
            self._weights_cache[key] = (omega, XW)
        return omega, XW

    def _gene_sums(self, tau: np.ndarray, rows: np.ndarray, Rt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per gene at its tau, with ``omega_a = lam^a w^(a+1)`` (a = 0..3): ``s[a] = sum_j omega_a r~_j^2`` (4,
        genes) and ``u[a] = X~'(omega_a r~)`` (4, genes, p); one pass over each gene's donors, in blocks of genes."""
        m, n, p = len(rows), len(self.lam), self.p
        s = np.empty((4, m))
        u = np.empty((4, m, p))
        size = max(1, BLOCK_ELEMENTS // max(n, 1))
        w_buf = np.empty((min(size, m), n))
        a_buf = np.empty(4 * min(size, m) * n)
        for a in range(0, m, size):
            g = min(size, m - a)
            r = Rt[rows[a : a + g]]
            w = np.multiply(tau[a : a + g, None], self.lam, out=w_buf[:g])
            w += 1.0  # 1 + tau lam = 1 / w
            wr = a_buf[: 4 * g * n].reshape(4, g, n)  # omega_a r~
            np.divide(r, w, out=wr[0])
            np.divide(self.lam, w, out=w)  # lam w
            for k in (1, 2, 3):
                np.multiply(w, wr[k - 1], out=wr[k])
            s[:, a : a + g] = np.matmul(wr[:, :, None, :], r[:, :, None])[:, :, 0, 0]
            u[:, a : a + g] = (self.XT @ wr.reshape(4 * g, n).T).reshape(p, 4, g).transpose(1, 2, 0)
        return s, u

    def evaluate(self, tau: np.ndarray, rows: np.ndarray, Rt: np.ndarray, W: np.ndarray, XR: np.ndarray) -> Evaluation:
        """Exact REML quantities of the genes ``rows`` (of ``Rt``, ``W``, ``XR = Rt X~``) at a per-gene ``tau``.

        With ``d = r~ - X~ beta``, the sums of ``omega_a d^2`` and ``X~'(omega_a d)`` in the derivatives (see
        ``docs/model.md``) are expanded in the per-gene sums of :meth:`_gene_sums` and the shared ``M_a``.
        """
        tau = np.ascontiguousarray(tau, dtype=np.float64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        s, u = self._gene_sums(tau, rows, Rt)
        M, logdet, h, Ainv = self.functions.at(tau)  # (genes, 4, p, p), ..., (genes, p, p)
        return self._combine(s, u, XR[rows], W[rows], M, Ainv, logdet, h)

    def _combine(self, s, u, XR, W, M, Ainv, logdet, h) -> Evaluation:
        """The REML quantities from the per-gene sums ``s``, ``u`` and the functions of tau ``M``, ``A^-1``, the
        log-determinant and ``h`` (arrays over the same genes)."""
        b = u[0] - XR
        beta = _matvec(Ainv, b)
        q = W + s[0] - _dot(b, beta)
        M1b = _matvec(M[:, 1], beta)
        M2b = _matvec(M[:, 2], beta)
        c = u[1] - M1b  # X~'(omega_1 d)
        gamma = _matvec(Ainv, c)
        dq = -(s[1] - 2.0 * _dot(beta, u[1]) + _dot(beta, M1b))
        d2q = 2.0 * (s[2] - 2.0 * _dot(beta, u[2]) + _dot(beta, M2b) - _dot(c, gamma))
        s3 = s[3] - 2.0 * _dot(beta, u[3]) + _dot(beta, _matvec(M[:, 3], beta))
        M1g = _matvec(M[:, 1], gamma)
        d3q = -6.0 * (s3 - 2.0 * _dot(gamma, u[2] - M2b) + _dot(gamma, M1g))
        with np.errstate(invalid="ignore", divide="ignore"):
            loglik = self._loglik(np.where(q > 0, q, np.nan), logdet)
            r = dq / q
            dl = -0.5 * (self.df * r + h[:, 0])
            d2l = -0.5 * (self.df * (d2q / q - r * r) - h[:, 1])
            d3l = -0.5 * (self.df * (d3q / q - 3.0 * r * d2q / q + 2.0 * r**3) + 2.0 * h[:, 2])
        beta2 = 2.0 * _matvec(Ainv, u[2] - M2b - M1g)
        return Evaluation(loglik, dl, d2l, q, beta, Ainv, d3l, dq, d2q, d3q, gamma, beta2, M[:, 1], M[:, 2])

    def residuals(self, Rt: np.ndarray, beta: np.ndarray, out: np.ndarray) -> None:
        """The rotated GLS residuals ``r~ - X~ beta`` into ``out`` (in blocks of genes)."""
        size = max(1, 4 * BLOCK_ELEMENTS // max(len(self.lam), 1))
        for a in range(0, len(Rt), size):
            np.subtract(Rt[a : a + size], beta[a : a + size] @ self.XT, out=out[a : a + size])


def _inverse_factor(A: np.ndarray) -> np.ndarray:
    """``K`` with ``A^-1 = K K'`` for a stack of symmetric positive semi-definite matrices (pseudo-inverse when
    singular)."""
    s, Q = np.linalg.eigh(A)
    top = np.max(np.abs(s), axis=-1, keepdims=True)
    keep = s > top * A.shape[-1] * np.finfo(float).eps
    inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, s, 1.0)), 0.0)
    return Q * inv_sqrt[..., None, :]


def search(problem: RemlProblem, Rt: np.ndarray, W: np.ndarray, resid: np.ndarray, out: GeneFits) -> None:
    """Maximise the REML log-likelihood over tau >= 0 for every gene of ``Rt`` (genes x donors).

    A shared grid brackets each gene's maximum; the first evaluation is at the best grid point (shared weights), a
    boundary solution when that is an end of the grid and the slope points outwards; otherwise a safeguarded Halley
    iteration (Newton's step when Halley's leaves the bracket, bisection when Newton's does too or the curvature is
    not negative) refines it, all genes at once, until the step is below ``XTOL`` relative (the evaluated tau is the
    answer), or a Halley step below ``NEAR2`` (a Newton step below ``NEAR``) relative, whose end point is exact to
    about the step's cube (square) and is the answer: its results follow from the last evaluation's derivatives
    (:meth:`Evaluation.moved`). ``out`` receives tau, loglik, converged, n_iter (evaluations), tau_se, beta, Ainv and
    sigma2_e; ``resid`` the rotated GLS residuals.
    """
    grid = problem.grid_taus
    G = Rt.shape[0]
    R2 = Rt * Rt
    ll, XR = problem.grid(Rt, W, R2)
    best = np.argmax(np.where(np.isfinite(ll), ll, -np.inf), axis=0)
    tau = grid[best]
    lo = grid[np.maximum(best - 1, 0)]
    hi = grid[np.minimum(best + 1, len(grid) - 1)]
    converged = np.zeros(G, dtype=bool)
    n_iter = np.ones(G, dtype=np.int64)

    def finish(idx, ev, sel=slice(None)):
        out.tau[idx] = tau[idx]
        out.loglik[idx] = ev.loglik[sel]
        out.sigma2_e[idx] = ev.q[sel] / problem.df
        out.beta[idx] = ev.beta[sel]
        out.Ainv[idx] = ev.Ainv[sel]
        d2l = ev.d2loglik[sel]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.tau_se[idx] = np.where(d2l < 0, np.sqrt(-1.0 / d2l), np.nan)

    # the first evaluation at each gene's best grid point (shared weights: GEMMs); a maximum on the grid's ends is a
    # boundary solution when the slope there points outwards
    ev = problem.evaluate_shared(grid, best, Rt, W, XR, R2)
    del R2
    at_end = ((best == 0) & (ev.dloglik <= 0)) | ((best == len(grid) - 1) & (ev.dloglik >= 0))
    converged[at_end] = True
    finish(np.flatnonzero(at_end), ev, at_end)

    def advance(active, ev, it):
        """A safeguarded Halley step from ``ev``, the evaluation of the genes ``active``; returns those still going."""
        t = tau[active]
        dl, d2l = ev.dloglik, ev.d2loglik
        up = dl > 0
        lo[active] = np.where(up, t, lo[active])
        hi[active] = np.where(up, hi[active], t)
        lo_a, hi_a = lo[active], hi[active]
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = t - dl / d2l
            # Halley's step (cubic convergence) where it stays in the bracket
            halley = t - 2.0 * dl * d2l / (2.0 * d2l * d2l - dl * ev.d3loglik)
            closer = np.abs(halley - newton) < np.abs(newton - t)  # a refinement of Newton's step, not a jump
            use = np.isfinite(halley) & (halley > lo_a) & (halley < hi_a) & closer
            newton = np.where(use, halley, newton)
        good = (d2l < 0) & (newton > lo_a) & (newton < hi_a)
        mid = np.where(lo_a > 0, np.sqrt(lo_a * hi_a), 0.5 * (lo_a + hi_a))
        new = np.where(dl == 0, t, np.where(good, newton, mid))  # a zero slope is the answer itself
        step = np.abs(new - t)
        done = (step <= XTOL * np.maximum(t, 1e-300)) | (hi_a - lo_a <= XTOL * hi_a) | (dl == 0)
        near = ~done & good & (step <= np.where(use, NEAR2, NEAR) * t)
        n_iter[active] = it
        converged[active[done | near]] = True
        finish(active[done], ev, done)  # the evaluated tau, within XTOL of the next step
        tau[active[~done]] = new[~done]
        if near.any():  # the step's end point, within about the step's cube (Halley) or square (Newton) of the maximum
            finish(active[near], ev.moved(near, (new - t)[near], problem, t[near]))
        return active[~done & ~near]

    active = advance(np.flatnonzero(~at_end), ev.take(~at_end), 1)
    for it in range(2, MAX_ITER + 1):
        if not len(active):
            break
        active = advance(active, problem.evaluate(tau[active], active, Rt, W, XR), it)
    if len(active):  # not converged: the last step's tau
        finish(active, problem.evaluate(tau[active], active, Rt, W, XR))
    problem.residuals(Rt, out.beta, resid)
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
CHUNK_ELEMENTS = 1 << 21
#: Chunks per core of the machine at least (when there are genes enough), so that the threads finish together.
CHUNKS_PER_CORE = 8
#: Cores counted at most by that rule: on a large machine, smaller chunks would cost more than the balance gains.
CHUNK_CORES_MAX = 16


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity), whatever ``n_threads``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def default_chunk_size(n_donors: int, n_genes: int | None = None) -> int:
    """Genes per chunk for ``n_donors`` donors: large chunks stream the rotation's ``U`` fewer times, but at least
    :data:`CHUNKS_PER_CORE` chunks per core of the machine (up to :data:`CHUNK_CORES_MAX` cores) when there are
    ``n_genes``.

    The rule does not depend on the thread count: a GEMM's bits can depend on its size (OpenBLAS takes other kernels
    for small products), so the same chunks on any number of threads keep the results bit-identical."""
    size = CHUNK_ELEMENTS // max(n_donors, 1)
    if n_genes is not None:
        size = min(size, -(-n_genes // (CHUNKS_PER_CORE * min(machine_cores(), CHUNK_CORES_MAX))))
    return int(max(16, size))


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
    Rt = np.ascontiguousarray(Rt, dtype=np.float64)  # float64, C order for the GEMMs
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
            ev = problem.evaluate_shared(np.array([float(tau)]), np.zeros(G, dtype=np.int64), Rt, W, Rt @ problem.Xrot)
            problem.residuals(Rt, ev.beta, resid)
            local.tau[:] = float(tau)
            local.loglik[:] = ev.loglik
            local.sigma2_e[:] = ev.q / problem.df
            local.beta[:] = ev.beta
            local.Ainv[:] = ev.Ainv
            local.converged[:] = True
    local.loglik = np.where(local.tau == 0, ll0, local.loglik)  # the same number at the boundary, whatever the rounding
    local.tau_se = np.where(local.tau == 0, np.nan, local.tau_se)  # no curvature at the boundary (docs/model.md)
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
    """Fit every gene, in chunks of genes; ``rotate(sl, out)`` writes the rotated residual donor sums of a slice of
    genes into ``out`` (where their residuals go in the end) and returns it.

    Chunks are fitted by ``n_threads`` concurrent threads (default: the BLAS thread limit in effect), each
    with single-threaded BLAS; every gene's result is the same whatever the thread count or chunk size. The
    distributed counterpart is :func:`._dask.fit_genes_distributed` (the caller chooses).
    """
    G, n, p = len(W), len(problem.lam), problem.p
    threads = available_threads() if n_threads is None else max(1, int(n_threads))
    if chunk_size is None:
        chunk_size = default_chunk_size(n, G)
    out = GeneFits.empty(G, n, p)
    slices = [slice(a, min(G, a + chunk_size)) for a in range(0, G, chunk_size)]
    timer = StageTimer()

    def work(sl: slice) -> slice:
        with timer("rotation"):
            Rt = rotate(sl, out.resid[sl])
        fit_chunk(problem, Rt, W[sl], tau=tau, timer=timer, out=out, sl=sl)
        return sl

    n_workers = min(threads, len(slices))
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

    def __call__(self, sl: slice, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(self.Tt[:, sl].T, self.U, out=out)
