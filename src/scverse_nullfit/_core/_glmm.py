"""Count traits: Poisson and negative-binomial (NB2) mixed models fitted by Laplace maximum likelihood.

The objective is that of ``lme4::glmer(nAGQ=1)`` (Poisson) and glmmTMB's ``nbinom2`` (observed weights in the
log-determinant), with ``u ~ N(0, sigma2_g G)`` written as ``u = sigma L v``, ``G = L L'`` block by block (the
relmat construction of lme4qtl). Arrays in, arrays out; the AnnData plumbing lives in :mod:`scverse_nullfit.tl`.
The maths is in ``docs/model.md``.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import linalg, sparse, stats
from scipy.sparse import csgraph

from . import _glmm_kernels as K

FAMILIES = {"poisson": K.POISSON, "negative_binomial": K.NEGATIVE_BINOMIAL}


@dataclass
class DonorBlocks:
    """A donor covariance ``G`` as independent blocks, each with a square factor ``G_b = L_b L_b'``."""

    ptr: np.ndarray  #: (blocks + 1,) offsets into ``donors``
    donors: np.ndarray  #: (donors,) donor indices, grouped by block
    L: np.ndarray  #: flattened row-major factors, block after block
    loff: np.ndarray  #: (blocks,) offsets into ``L``

    @property
    def n_donors(self) -> int:
        return len(self.donors)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.ptr)

    @property
    def kind(self) -> str:
        sizes = self.sizes
        if (sizes == 1).all():
            return "diagonal"
        return "dense" if len(sizes) == 1 else "block-diagonal"


def donor_blocks(G: np.ndarray | None, n_donors: int | None = None, *, name: str = "GRM") -> DonorBlocks:
    """Split ``G`` into the connected components of its non-zero pattern and factor each block.

    ``G=None`` is the identity over ``n_donors`` donors. Each block is factored through its eigendecomposition
    (``L = U diag(sqrt(lam))``), so a positive semi-definite block works; negative eigenvalues are clipped to 0,
    with a warning when they are clearly negative.
    """
    if G is None:
        if n_donors is None:
            raise ValueError("donor_blocks needs G or n_donors.")
        n = int(n_donors)
        return DonorBlocks(np.arange(n + 1), np.arange(n), np.ones(n), np.arange(n))
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{name} must be a square matrix, not shape {G.shape}.")
    if not np.isfinite(G).all():
        raise ValueError(f"{name} has NaN or infinite entries.")
    n = G.shape[0]
    pattern = sparse.csr_matrix(G != 0)
    n_comp, labels = csgraph.connected_components(pattern, directed=False)
    order = np.argsort(labels, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_comp))])
    factors, loff, pos, worst = [], [], 0, 0.0
    for b in range(n_comp):
        idx = order[ptr[b] : ptr[b + 1]]
        Gb = G[np.ix_(idx, idx)]
        if len(idx) == 1:
            lam, U = Gb[0], np.ones((1, 1))
        else:
            try:
                lam, U = linalg.eigh((Gb + Gb.T) / 2, check_finite=False)
            except (linalg.LinAlgError, ValueError) as err:
                raise ValueError(f"{name}: the eigendecomposition of a block of {len(idx)} donors failed ({err}).")
        top = max(np.abs(lam).max(), 1e-300)
        worst = min(worst, lam.min() / top)
        Lb = U * np.sqrt(np.clip(lam, 0.0, None))
        factors.append(Lb.ravel())
        loff.append(pos)
        pos += Lb.size
    if worst < -1e-6:
        warnings.warn(f"{name} is not positive semi-definite (relative eigenvalue {worst:.3g}); clipped to 0.", stacklevel=2)
    return DonorBlocks(ptr.astype(np.int64), order.astype(np.int64), np.concatenate(factors), np.array(loff, dtype=np.int64))


def sparsify_grm(G: np.ndarray, cutoff: float) -> np.ndarray:
    """Set the off-diagonal entries of ``G`` with ``|G_ij| < cutoff`` to zero, as SAIGE-QTL users do.

    This is a modelling choice of the user (donors less related than ``cutoff`` are treated as unrelated), not an
    approximation of the exact model with the dense GRM: the sparsified matrix defines its own model. It makes the
    fit block-diagonal (:func:`donor_blocks`), hence fast. The result may not be positive semi-definite; the
    block factorisation clips negative eigenvalues and warns.
    """
    G = np.array(G, dtype=np.float64)
    if not np.isfinite(cutoff) or cutoff < 0:
        raise ValueError(f"cutoff must be a finite number >= 0, not {cutoff!r}.")
    diag = np.diag(G).copy()
    G[np.abs(G) < cutoff] = 0.0
    np.fill_diagonal(G, diag)
    return G


@dataclass
class CountFits:
    """Per-gene results of the count GLMM (arrays over genes first)."""

    beta: np.ndarray  #: (genes, p)
    beta_se: np.ndarray  #: (genes, p)
    sigma2_g: np.ndarray
    sigma2_g_se: np.ndarray
    theta: np.ndarray  #: NaN for the Poisson family
    loglik: np.ndarray  #: Laplace log-likelihood (lme4/glmmTMB convention)
    loglik0: np.ndarray  #: log-likelihood at sigma2_g = 0 (the GLM)
    converged: np.ndarray
    boundary: np.ndarray  #: sigma2_g = 0 is the optimum
    n_iter: np.ndarray
    u: np.ndarray  #: (genes, donors) mode of the donor effects

    @property
    def lrt(self) -> np.ndarray:
        return np.where(self.converged, np.maximum(2.0 * (self.loglik - self.loglik0), 0.0), np.nan)

    @property
    def pval(self) -> np.ndarray:
        """Likelihood-ratio p-value of sigma2_g > 0 under the 50:50 mixture of chi2_0 and chi2_1."""
        lrt = self.lrt
        return np.where(np.isfinite(lrt), np.where(lrt > 0, 0.5 * stats.chi2.sf(lrt, 1), 1.0), np.nan)


def check_counts(Y, gene_names=None, cell_names=None) -> None:
    """Raise a ValueError naming a gene and a cell when counts are negative, non-integer or non-finite."""
    M = Y.tocsc() if sparse.issparse(Y) else np.asarray(Y)
    data = M.data if sparse.issparse(M) else M
    bad = ~np.isfinite(data) | (data < 0) | (data != np.round(data))
    if not bad.any():
        return
    if sparse.issparse(M):
        k = int(np.flatnonzero(bad)[0])
        gene = int(np.searchsorted(M.indptr, k, side="right") - 1)
        cell = int(M.indices[k])
        value = M.data[k]
    else:
        cell, gene = (int(i) for i in np.argwhere(bad)[0])
        value = M[cell, gene]
    gname = gene_names[gene] if gene_names is not None else gene
    cname = cell_names[cell] if cell_names is not None else cell
    what = "non-finite" if not np.isfinite(value) else ("negative" if value < 0 else "non-integer")
    raise ValueError(
        f"count families need raw counts, but gene {gname!r} has a {what} value ({value!r}) in cell {cname!r} "
        f"({int(bad.sum())} such values in all)."
    )


def check_offset(offset, n_cells: int, name: str = "offset", cell_names=None) -> np.ndarray:
    """The offset as float64, rejecting a wrong length or non-finite values (naming a cell)."""
    if offset is None:
        return np.zeros(n_cells)
    off = np.asarray(offset, dtype=np.float64).ravel()
    if off.shape != (n_cells,):
        raise ValueError(f"{name} has {off.size} values but there are {n_cells} cells.")
    bad = ~np.isfinite(off)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cname = cell_names[i] if cell_names is not None else i
        raise ValueError(f"{name} is non-finite in {int(bad.sum())} cells (first: {cname!r}, value {off[i]!r}).")
    return off


def _as_csc(Y) -> sparse.csc_matrix:
    if sparse.issparse(Y):
        M = sparse.csc_matrix(Y)
    else:
        M = sparse.csc_matrix(np.asarray(Y))
    M.sort_indices()
    M.sum_duplicates()
    return M


def fit_counts(
    Y,
    codes: np.ndarray,
    X: np.ndarray,
    *,
    family: str = "poisson",
    offset: np.ndarray | None = None,
    G: np.ndarray | DonorBlocks | None = None,
    n_donors: int | None = None,
    n_threads: int = 1,
    gene_names=None,
    cell_names=None,
) -> CountFits:
    """Fit the count GLMM of every column of ``Y`` (cells x genes: counts, dense or scipy sparse).

    Parameters
    ----------
    Y
        Raw counts, cells x genes.
    codes
        Each cell's donor index (0 .. donors-1), in the order of ``G``.
    X
        Design (cells x p), intercept included, full column rank.
    family
        ``"poisson"`` or ``"negative_binomial"`` (NB2, per-gene theta).
    offset
        Log-scale offset per cell (default 0).
    G
        The donor covariance: ``None`` (identity), a dense matrix (split into blocks by its zero pattern), or
        :class:`DonorBlocks`.
    n_donors
        Number of donors when ``G`` is None (default ``codes.max() + 1``).
    n_threads
        Threads over genes.
    gene_names, cell_names
        Used in error messages.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)} for count models, not {family!r}.")
    fam = FAMILIES[family]
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    N = codes.shape[0]
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != N:
        raise ValueError(f"design has shape {X.shape}, expected ({N}, p).")
    if Y.shape[0] != N:
        raise ValueError(f"counts have {Y.shape[0]} cells, the donor codes {N}.")
    off = check_offset(offset, N, cell_names=cell_names)
    check_counts(Y, gene_names, cell_names)
    if isinstance(G, DonorBlocks):
        blocks = G
    else:
        if n_donors is None:
            n_donors = int(codes.max()) + 1 if G is None else np.asarray(G).shape[0]
        blocks = donor_blocks(G, n_donors)
    n = blocks.n_donors
    if N and (codes.min() < 0 or codes.max() >= n):
        raise ValueError(f"donor codes must lie in 0..{n - 1}.")
    M = _as_csc(Y)
    M.data = M.data.astype(np.float64, copy=False)
    genes = M.shape[1]
    p = X.shape[1]
    beta = np.full((genes, p), np.nan)
    s2 = np.full(genes, np.nan)
    theta = np.full(genes, np.nan)
    ll = np.full(genes, np.nan)
    ll0 = np.full(genes, np.nan)
    status = np.full(genes, K.FAILED, dtype=np.int64)
    iters = np.zeros(genes, dtype=np.int64)
    se = np.full((genes, p + 2), np.nan)
    u = np.full((genes, n), np.nan)
    indptr = M.indptr.astype(np.int64)
    indices = M.indices.astype(np.int64)
    # genes with fewer than two non-zero cells have no estimable model: they stay NaN
    nnz = np.diff(indptr)

    def work(lo_hi):
        lo, hi = lo_hi
        K.fit_genes_range(
            fam, lo, hi, indptr, indices, M.data, codes, off, X, blocks.ptr, blocks.donors, blocks.L, blocks.loff,
            beta, s2, theta, ll, ll0, status, iters, se, u,
        )

    chunk = max(1, min(64, -(-genes // max(1, 4 * n_threads))))
    ranges = [(lo, min(genes, lo + chunk)) for lo in range(0, genes, chunk)]
    if n_threads > 1 and len(ranges) > 1:
        with ThreadPoolExecutor(n_threads) as ex:
            list(ex.map(work, ranges))
    else:
        for r in ranges:
            work(r)
    bad = (status == K.FAILED) | (nnz < 2)
    converged = ~bad
    for arr in (beta, se, u):
        arr[bad] = np.nan
    for arr in (s2, theta, ll, ll0):
        arr[bad] = np.nan
    if fam == K.POISSON:
        theta[:] = np.nan
    s2_se = s2 * se[:, p]
    return CountFits(
        beta=beta,
        beta_se=se[:, :p],
        sigma2_g=s2,
        sigma2_g_se=s2_se,
        theta=theta,
        loglik=ll,
        loglik0=ll0,
        converged=converged,
        boundary=converged & (status == K.BOUNDARY),
        n_iter=iters,
        u=u,
    )
