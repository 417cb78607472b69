"""Step 3 of the pipeline: the sufficient statistics of every gene, in one pass over the cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ._design import Donors, Spectral, donor_sums, incidence
from ._read import BLOCK_ELEMENTS, iter_blocks


@dataclass
class SuffStats:
    """Per-gene sums over cells, accumulated in float64."""

    S: np.ndarray  #: (donors, genes) donor sums Z'y
    XtY: np.ndarray  #: (p, genes) X'y
    mean: np.ndarray  #: (genes,) mean over cells
    M2: np.ndarray  #: (genes,) centred sum of squares sum (y - mean)^2
    n_cells: int

    def merge(self, other: SuffStats) -> SuffStats:
        """Add the statistics of a disjoint set of cells in place (the reduce of a map-reduce); return self."""
        n_a, n_b = self.n_cells, other.n_cells
        n = n_a + n_b
        if n_b == 0:
            return self
        delta = other.mean - self.mean
        self.S += other.S
        self.XtY += other.XtY
        self.mean += delta * (n_b / n)
        self.M2 += other.M2 + delta**2 * (n_a * n_b / n)
        self.n_cells = n
        return self


def block_stats(block, codes: np.ndarray, n_donors: int, X: np.ndarray) -> SuffStats:
    """Sufficient statistics of one block of cells (dense array or CSR matrix), in float64.

    ``codes`` and ``X`` are the block's rows of the donor codes and of the design.
    """
    nb = block.shape[0]
    Zt = incidence(codes, n_donors)
    if isinstance(block, np.ndarray):
        B = np.asarray(block, dtype=np.float64)
        S = np.asarray(Zt @ B)
        XtY = X.T @ B
        mean = B.mean(axis=0) if nb else np.zeros(B.shape[1])
        M2 = np.einsum("ij,ij->j", B - mean, B - mean)
    else:
        B = block.astype(np.float64)
        S = (Zt @ B).toarray()
        XtY = np.asarray(B.T @ X).T
        genes = B.shape[1]
        total = np.bincount(B.indices, weights=B.data, minlength=genes)
        sumsq = np.bincount(B.indices, weights=B.data * B.data, minlength=genes)
        mean = total / max(nb, 1)
        M2 = np.maximum(sumsq - nb * mean * mean, 0.0)
    return SuffStats(S=S, XtY=np.ascontiguousarray(XtY), mean=mean, M2=M2, n_cells=nb)


def sufficient_stats(
    Y, genes: np.ndarray, donors: Donors, X: np.ndarray, *, block_elements: int = BLOCK_ELEMENTS
) -> SuffStats:
    """One pass over ``Y[:, genes]`` (dense, sparse, backed or dask), never holding more than one block."""
    n_donors, p, G = len(donors.ids), X.shape[1], len(genes)
    acc = SuffStats(S=np.zeros((n_donors, G)), XtY=np.zeros((p, G)), mean=np.zeros(G), M2=np.zeros(G), n_cells=0)
    for cells, gs, block in iter_blocks(Y, genes, block_elements=block_elements):
        part = block_stats(block, donors.codes[cells], n_donors, X[cells])
        if gs.stop - gs.start == G:
            acc = acc.merge(part)
        else:  # column-major input: each gene slice arrives once, with all cells
            acc.S[:, gs], acc.XtY[:, gs], acc.mean[gs], acc.M2[gs] = part.S, part.XtY, part.mean, part.M2
    acc.n_cells = int(X.shape[0])
    return acc


@dataclass
class PreResiduals:
    """Each gene centred and residualised on X by ordinary least squares, in sufficient-statistic form.

    The REML quadratic forms are computed on these residuals ``r = y - mean - X b0``, which avoids the
    cancellation that a large mean would cause; ``X'r = 0`` by construction.
    """

    mean: np.ndarray  #: (genes,) mean over cells
    b0: np.ndarray  #: (genes, p) OLS coefficients of the centred gene (intercept excluded from the mean)
    rr: np.ndarray  #: (genes,) r'r
    T: np.ndarray  #: (donors, genes) donor sums Z'r
    W: np.ndarray  #: (genes,) within-donor sum of squares of r
    ok: np.ndarray  #: (genes,) finite, with residual variance left to fit


def pre_residualise(stats: SuffStats, donors: Donors, X: np.ndarray, spectral: Spectral) -> PreResiduals:
    """OLS residuals' sufficient statistics from the raw ones; genes with nothing to fit are flagged."""
    c = donors.counts
    ZtX = donor_sums(X, donors)
    colsum = ZtX.sum(axis=0)
    Sc = stats.S - c[:, None] * stats.mean[None, :]
    Xyc = stats.XtY - colsum[:, None] * stats.mean[None, :]
    chol = linalg.cho_factor(spectral.XtX, check_finite=False)
    b0 = linalg.cho_solve(chol, Xyc, check_finite=False)
    rr = stats.M2 - np.einsum("pg,pg->g", Xyc, b0)
    T = Sc - ZtX @ b0
    W = rr - np.einsum("ng,ng->g", T, T / c[:, None])
    if np.all(c == 1):
        W = np.zeros_like(W)
    W = np.maximum(W, 0.0)

    finite = np.isfinite(stats.M2) & np.isfinite(stats.S).all(axis=0) & np.isfinite(stats.XtY).all(axis=0)
    scale = np.where(finite, stats.M2 + stats.n_cells * stats.mean**2, 0.0)
    ok = finite & (rr > 1e-10 * scale) & (stats.M2 > 0)
    rr = np.where(ok, rr, np.nan)
    return PreResiduals(mean=stats.mean, b0=b0.T.copy(), rr=rr, T=T, W=W, ok=ok)
