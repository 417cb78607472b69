"""Shared fixtures: tiny simulated data sets."""

import numpy as np
import pandas as pd
import pytest
from scipy import linalg, optimize, sparse
from threadpoolctl import threadpool_limits

import scverse_nullfit as snf

COVARIATES = ["age", "sex", "cell_type", "log_counts"]
DONOR_COVARIATES = ["age", "sex"]


def _dask(X, chunks, *, csr: bool = False):
    da = pytest.importorskip("dask.array")
    X = np.asarray(X)
    return da.from_array(sparse.csr_matrix(X), chunks=chunks, asarray=False) if csr else da.from_array(X, chunks=chunks)


#: Every in-memory storage of an expression matrix the tools accept, by name: ``ARRAY_TYPES[name](X)``.
ARRAY_TYPES = {
    "dense_f32": lambda X: np.asarray(X, np.float32),
    "dense_f64": lambda X: np.asarray(X, np.float64),
    "fortran_f64": lambda X: np.asfortranarray(X, np.float64),
    "csr_f32": lambda X: sparse.csr_matrix(np.asarray(X, np.float32)),
    "csr_f64": lambda X: sparse.csr_matrix(np.asarray(X, np.float64)),
    "csc_f32": lambda X: sparse.csc_matrix(np.asarray(X, np.float32)),
    "csc_f64": lambda X: sparse.csc_matrix(np.asarray(X, np.float64)),
    "csr_array": lambda X: sparse.csr_array(np.asarray(X)),
    "dask_dense": lambda X: _dask(X, (37, -1)),
    "dask_dense_2d": lambda X: _dask(X, (70, 5)),
    "dask_csr": lambda X: _dask(X, (53, -1), csr=True),
    "dask_csr_2d": lambda X: _dask(X, (61, 7), csr=True),
}


@pytest.fixture(scope="session")
def small_adata():
    """About 300 cells from 40 related donors, 8 genes; copy it before modifying."""
    return snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=8, seed=1)


@pytest.fixture
def adata(small_adata):
    return small_adata.copy()


@pytest.fixture(scope="module")
def fitted(small_adata):
    """A copy of ``small_adata`` with a null-model fit under "nullfit", once per test module."""
    adata = small_adata.copy()
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    return adata


# --------------------------------------------------------------------------------------------------------------
# Oracles: a design matrix built independently of the package, and a dense cells x cells REML (tests only).
# --------------------------------------------------------------------------------------------------------------


def design_matrix(obs, covariates) -> tuple[np.ndarray, list[str]]:
    """Intercept + covariates (categoricals one-hot, first level dropped), built without the package's code."""
    blocks, names = [np.ones((len(obs), 1))], ["intercept"]
    for col in covariates:
        s = obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            levels = list(s.cat.remove_unused_categories().cat.categories)
            for lev in levels[1:]:
                blocks.append((s == lev).to_numpy(np.float64)[:, None])
                names.append(f"{col}[{lev}]")
        else:
            blocks.append(s.to_numpy(np.float64)[:, None])
            names.append(col)
    return np.hstack(blocks), names


class DenseReml:
    """Exact REML of ``y = X b + Z u + e`` with ``H = I + tau K`` (``K = Z G Z'``, N x N), by dense Cholesky."""

    def __init__(self, X: np.ndarray, K: np.ndarray):
        self.X, self.K = np.asarray(X, np.float64), np.asarray(K, np.float64)
        self.N, self.p = self.X.shape
        self.df = self.N - self.p

    @classmethod
    def from_adata(cls, adata, covariates, grm: pd.DataFrame | None = None, donor_key: str = "donor_id"):
        X, _ = design_matrix(adata.obs, covariates)
        labels = adata.obs[donor_key].astype(str).to_numpy()
        grm = adata.uns["grm"] if grm is None else grm
        K = grm.loc[labels, labels].to_numpy(np.float64)
        return cls(X, K)

    def at(self, y: np.ndarray, tau: float) -> dict:
        """REML quantities at a fixed tau."""
        with threadpool_limits(limits=1, user_api="blas"):  # small matrices: threads only contend
            return self._at(y, tau)

    def _at(self, y: np.ndarray, tau: float) -> dict:
        y = np.asarray(y, np.float64)
        H = np.eye(self.N) + tau * self.K
        cf = linalg.cho_factor(H, lower=True)
        HX = linalg.cho_solve(cf, self.X)
        A = self.X.T @ HX
        beta = np.linalg.solve(A, HX.T @ y)
        r = y - self.X @ beta
        q = r @ linalg.cho_solve(cf, r)
        s2 = q / self.df
        logdet_h = 2.0 * np.log(np.diag(cf[0])).sum()
        logdet_a = np.linalg.slogdet(A)[1]
        ll = -0.5 * (self.df * np.log(2 * np.pi * s2) + logdet_h + logdet_a + self.df)
        return {"tau": tau, "loglik": ll, "sigma2_e": s2, "sigma2_g": tau * s2, "beta": beta}

    def _fast_loglik(self, yt: np.ndarray, Xt: np.ndarray, tau: float) -> float:
        """The same REML through the N x N eigendecomposition of K (used only to drive the search)."""
        w = 1.0 / (1.0 + tau * self._s)
        A = (Xt * w[:, None]).T @ Xt
        beta = np.linalg.solve(A, (Xt * w[:, None]).T @ yt)
        r = yt - Xt @ beta
        q = (w * r) @ r
        logdet = np.log1p(tau * self._s).sum() + np.linalg.slogdet(A)[1]
        return -0.5 * (self.df * np.log(2 * np.pi * q / self.df) + logdet + self.df)

    def fit(self, y: np.ndarray) -> dict:
        """Maximise over tau >= 0: a grid over log tau, then bounded Brent in the best cell, plus tau = 0.

        The search runs on the eigendecomposition of the N x N ``K``; the optimum is re-evaluated by Cholesky.
        """
        with threadpool_limits(limits=1, user_api="blas"):  # small matrices: threads only contend
            return self._fit(y)

    def _fit(self, y: np.ndarray) -> dict:
        if not hasattr(self, "_V"):
            s, self._V = np.linalg.eigh(self.K)
            self._s = np.clip(s, 0.0, None)
            self._Xt = self._V.T @ self.X
        yt = self._V.T @ np.asarray(y, np.float64)
        grid = np.linspace(np.log(1e-7), np.log(1e4), 45)
        lls = np.array([self._fast_loglik(yt, self._Xt, np.exp(s)) for s in grid])
        k = int(np.argmax(lls))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        res = optimize.minimize_scalar(
            lambda s: -self._fast_loglik(yt, self._Xt, np.exp(s)),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-11},
        )
        best = self._at(y, float(np.exp(res.x)))
        zero = self._at(y, 0.0)
        return zero if zero["loglik"] >= best["loglik"] else best


def dense_score(adata, genotypes: pd.DataFrame, cond: pd.DataFrame | None = None) -> dict:
    """Per gene, score and variance of each variant from the dense cells x cells P at the gene's fitted tau and
    sigma2_e; with ``cond`` (donors x variants), the design also holds the conditioning variants in cells (Z C)."""
    from scverse_nullfit._core._design import align_grm, build_design, donor_labels

    labels = donor_labels(adata.obs, "donor_id")
    G, donors = align_grm(adata.uns["grm"], labels, "test")
    X = build_design(adata.obs, COVARIATES, DONOR_COVARIATES, donors).X
    N = len(labels)
    Z = np.zeros((N, len(donors.ids)))
    Z[np.arange(N), donors.codes] = 1.0
    if cond is not None:
        X = np.hstack([X, Z @ cond.loc[donors.ids].to_numpy(np.float64)])
    ZGZ = Z @ G @ Z.T
    Zg = Z @ genotypes.loc[donors.ids].to_numpy(np.float64)
    Y = np.asarray(adata.X, dtype=np.float64)
    table = adata.varm["nullfit"]
    out = {}
    for j, gene in enumerate(adata.var_names):
        tau, s2e = table["tau"].iloc[j], table["sigma2_e"].iloc[j]
        Vinv = np.linalg.inv(s2e * (np.eye(N) + tau * ZGZ))
        VX = Vinv @ X
        P = Vinv - VX @ np.linalg.solve(X.T @ VX, VX.T)
        out[gene] = (Zg.T @ (P @ Y[:, j]), np.einsum("iv,iv->v", Zg, P @ Zg))
    return out


@pytest.fixture(scope="session")
def dense_reml():
    """The :class:`DenseReml` oracle class."""
    return DenseReml


@pytest.fixture(scope="session")
def design():
    """The :func:`design_matrix` helper."""
    return design_matrix
