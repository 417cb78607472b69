"""Step 3 of the pipeline: the sufficient statistics of every gene, in one pass over the cells.

Every statistic is a sum over cells, so the pass is a map-reduce: any set of cells gives partial sums
(:class:`Accumulator`), and partial sums of disjoint cells add up (:meth:`SuffStats.merge`). Sparse storage is
read by a compiled kernel straight from its ``indptr/indices/data`` arrays (no copy, no densifying); the donor
sums ``Z'y`` of donor-level design columns come for free from ``Z'Y`` at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scanpy import logging as logg
from scipy import linalg

from ._compiled import jit
from ._design import Donors, Spectral
from ._read import available_threads, iter_chunks


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
        if other.n_cells == 0:
            return self
        self.S += other.S
        self.XtY += other.XtY
        self.n_cells = merge_moments(self.mean, self.M2, self.n_cells, other.mean, other.M2, other.n_cells)
        return self


def merge_moments(mean: np.ndarray, M2: np.ndarray, n: int, mean_b: np.ndarray, M2_b: np.ndarray, n_b: int) -> int:
    """Chan update in place: ``mean``, ``M2`` of ``n`` values absorb those of ``n_b`` more; returns n + n_b."""
    total = n + n_b
    delta = mean_b - mean
    mean += delta * (n_b / total)
    M2 += M2_b + delta**2 * (n * n_b / total)
    return total


# ------------------------------------------------------------------------------------------------------------
# compiled kernels (float64 accumulation whatever the storage dtype)
# ------------------------------------------------------------------------------------------------------------


#: Columns of the per-gene record array R: the shift K, sum (y - K)^2, the count and the sum over stored values,
#: then X_c'y for the cell-level design columns. One record per gene keeps a stored value's updates in one cache line.
SHIFT, SS, COUNT, TOT, XTY0 = 0, 1, 2, 3, 4


@jit()
def _csr_kernel(indptr, indices, data, order, codes, Xc, gene_pos, all_genes, S, R):  # pragma: no cover - compiled
    """Rows ``order`` of a CSR chunk: S[code, g] += y, and the gene's record R[g] (see ``SHIFT`` ... ``XTY0``).

    The second moment is shifted by each gene's first stored value K_g (R[g, SS] += (y - K_g)^2 over the R[g, COUNT]
    stored values), so that a large mean does not cancel it away. Each row's zero covariates are skipped (one-hot
    columns are mostly zero).
    """
    pc = Xc.shape[1]
    nzc = np.empty(pc, dtype=np.int64)
    nzv = np.empty(pc)
    for ii in range(order.shape[0]):
        i = order[ii]
        d = codes[i]
        m = 0
        for c in range(pc):
            if Xc[i, c] != 0.0:
                nzc[m] = c + 4
                nzv[m] = Xc[i, c]
                m += 1
        for k in range(indptr[i], indptr[i + 1]):
            g = indices[k] if all_genes else gene_pos[indices[k]]
            if g < 0:
                continue
            v = np.float64(data[k])
            S[d, g] += v
            if R[g, 2] == 0.0:
                R[g, 0] = v
            e = v - R[g, 0]
            R[g, 1] += e * e
            R[g, 2] += 1.0
            R[g, 3] += v
            for c in range(m):
                R[g, nzc[c]] += nzv[c] * v


@jit()
def _csc_kernel(indptr, indices, data, col0, codes, Xc, gene_pos, S, R):  # pragma: no cover
    """Columns of a CSC chunk (global column ``col0 + j``), each summed over its cells in a local buffer.

    The second moment is shifted by the column's mean over its stored values (two passes over the column).
    """
    n_donors = S.shape[0]
    pc = Xc.shape[1]
    buf = np.zeros(n_donors)
    xbuf = np.zeros(pc)
    for j in range(indptr.shape[0] - 1):
        g = gene_pos[col0 + j]
        if g < 0:
            continue
        lo = indptr[j]
        hi = indptr[j + 1]
        t = 0.0
        for k in range(lo, hi):
            i = indices[k]
            v = np.float64(data[k])
            buf[codes[i]] += v
            t += v
            for c in range(pc):
                xbuf[c] += Xc[i, c] * v
        K = t / (hi - lo) if hi > lo else 0.0
        e2 = 0.0
        for k in range(lo, hi):
            e = np.float64(data[k]) - K
            e2 += e * e
        for d in range(n_donors):
            S[d, g] += buf[d]
            buf[d] = 0.0
        for c in range(pc):
            R[g, 4 + c] += xbuf[c]
            xbuf[c] = 0.0
        R[g, 0] = K
        R[g, 1] = e2
        R[g, 2] = hi - lo
        R[g, 3] = t


def warm_up(Y) -> None:
    """Compile (or load from numba's cache) the pass's kernel for the storage of ``Y``, e.g. in a background thread
    while the inputs are checked and stage 1 runs; nothing for dense or dask input."""
    if hasattr(Y, "group") and "indices" in Y.group:  # backed CSR/CSC (anndata's sparse dataset)
        fmt, indices, data = Y.format, Y.group["indices"], Y.group["data"]
    elif hasattr(Y, "indices") and hasattr(Y, "format"):  # scipy sparse
        fmt, indices, data = Y.format, Y.indices, Y.data
    else:
        return
    if fmt not in ("csr", "csc"):
        return
    idx, val = np.zeros(0, dtype=indices.dtype), np.zeros(0, dtype=data.dtype)
    i64, two = np.zeros(0, dtype=np.int64), np.zeros(2, dtype=np.int64)
    S, R, Xc = np.zeros((1, 1)), np.zeros((1, XTY0 + 1)), np.zeros((0, 1))
    if fmt == "csr":
        _csr_kernel(two, idx, val, i64, i64, Xc, i64, True, S, R)
    else:
        _csc_kernel(two, idx, val, 0, i64, Xc, np.full(1, -1, dtype=np.int64), S, R)


# ------------------------------------------------------------------------------------------------------------
# the map side
# ------------------------------------------------------------------------------------------------------------


def _raw_moments(R: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and centred sum of squares over ``n`` cells from a record array of shifted sums over stored values."""
    K, ss, count, tot = R[:, SHIFT], R[:, SS], R[:, COUNT], R[:, TOT]
    centred_sum = tot - n * K  # sum of (y - K) over all cells, zeros included
    M2 = ss + (n - count) * K * K - centred_sum * centred_sum / n
    return tot / n, np.maximum(M2, 0.0)


def _donor_runs(order: np.ndarray, codes: np.ndarray, indptr: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """Split rows visited in donor order into at most ``n_parts`` runs of whole donors with similar stored counts."""
    if n_parts <= 1 or len(order) < 2:
        return [order]
    sorted_codes = codes[order]
    nnz = np.cumsum(indptr[order + 1] - indptr[order])
    total = nnz[-1]
    if total == 0:
        return [order]
    cuts = []
    for t in range(1, n_parts):
        k = int(np.searchsorted(nnz, total * t / n_parts))
        # move the cut to the start of the next donor
        k = int(np.searchsorted(sorted_codes, sorted_codes[min(k, len(order) - 1)], side="right"))
        if 0 < k < len(order) and (not cuts or k > cuts[-1]):
            cuts.append(k)
    return np.split(order, cuts)


def donor_level_columns(X: np.ndarray, codes: np.ndarray, n_donors: int) -> np.ndarray:
    """Boolean mask of the design columns that are exactly constant within every donor."""
    first = np.full(n_donors, -1, dtype=np.int64)
    cells = np.arange(len(codes))
    first[codes[::-1]] = cells[::-1]  # the first cell of each donor (set for every donor that has a cell)
    return np.all(X == X[first[codes]], axis=0)


class Accumulator:
    """Partial sufficient statistics of the cells added so far (the map of the map-reduce).

    Parameters
    ----------
    codes
        Donor index of every cell the accumulator may see (indexed like the rows of ``X``).
    n_donors
        Number of donors.
    X
        The design, cells x p.
    genes
        Indices (into the matrix's columns) of the genes to accumulate, in output order.
    n_vars
        Number of columns of the matrix.
    donor_cols
        Mask of design columns constant within donors (their ``X'y`` is taken from ``Z'y``); computed when None.
    """

    def __init__(
        self,
        codes: np.ndarray,
        n_donors: int,
        X: np.ndarray,
        genes: np.ndarray,
        n_vars: int,
        *,
        donor_cols: np.ndarray | None = None,
        n_threads: int = 1,
    ):
        self.n_threads = max(1, int(n_threads))
        self._pool = None
        self.codes = np.ascontiguousarray(codes, dtype=np.int64)
        self.n_donors = int(n_donors)
        self.X = np.asarray(X, dtype=np.float64)
        self.genes = np.asarray(genes, dtype=np.int64)
        G = len(self.genes)
        self.gene_pos = np.full(n_vars, -1, dtype=np.int64)
        self.gene_pos[self.genes] = np.arange(G)
        self.all_genes = bool(G == n_vars and np.array_equal(self.genes, np.arange(n_vars)))
        if donor_cols is None:
            donor_cols = donor_level_columns(self.X, self.codes, self.n_donors)
        self.donor_cols = np.asarray(donor_cols, dtype=bool)
        self.Xc = np.ascontiguousarray(self.X[:, ~self.donor_cols])
        self.S = np.zeros((self.n_donors, G))
        # per gene, one record array per thread: sparse chunks' shifted moments, then X_c'y; cells per thread
        self.R = [np.zeros((G, XTY0 + self.Xc.shape[1])) for _ in range(self.n_threads)]
        self.n_raw = [0] * self.n_threads
        # dense chunks: centred (Welford) sums, and X_c'y
        self.XtYc_dense = np.zeros((G, self.Xc.shape[1]))
        self.mean = np.zeros(G)
        self.M2 = np.zeros(G)
        self.n_centred = 0

    def add(self, chunk, rows: np.ndarray | None = None) -> None:
        """Add one :class:`~._read.Chunk`; ``rows`` maps its cells to rows of ``codes``/``X`` (default: its range)."""
        if chunk.kind == "csc":
            if rows is not None:
                raise ValueError("a CSC chunk holds all cells; `rows` does not apply.")
            indptr = np.asarray(chunk.indptr, dtype=np.int64)
            _csc_kernel(
                indptr, chunk.indices, chunk.data, chunk.start, self.codes, self.Xc, self.gene_pos, self.S, self.R[0]
            )
            self.n_raw[0] = len(self.codes)  # every CSC chunk holds all cells (of a range of genes)
            return
        if rows is None:
            rows = np.arange(chunk.start, chunk.stop)
        if chunk.kind == "csr":
            self.add_csr(chunk.indptr, chunk.indices, chunk.data, rows)
        elif chunk.kind == "dense":
            self.add_dense(chunk.array, rows)
        else:
            raise ValueError(f"unknown chunk kind {chunk.kind!r}.")

    def add_csr(self, indptr, indices, data, rows: np.ndarray | slice) -> None:
        """Add CSR rows (one per cell of ``rows``), visited donor by donor for cache locality.

        With ``n_threads > 1`` the donors are split into runs summed by concurrent threads: every donor's sums are
        still accumulated by one thread in cell order, each thread keeping its own per-gene records.
        """
        codes = self.codes[rows]
        Xc = np.ascontiguousarray(self.Xc[rows])
        order = np.argsort(codes, kind="stable")
        indptr = np.asarray(indptr, dtype=np.int64)  # one compiled variant per index/value dtype, not per indptr
        args = (indptr, np.asarray(indices), np.asarray(data))
        rest = (codes, Xc, self.gene_pos, self.all_genes, self.S)
        parts = _donor_runs(order, codes, indptr, self.n_threads)
        if len(parts) == 1:
            _csr_kernel(*args, order, *rest, self.R[0])
            self.n_raw[0] += len(order)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="snf-sum")
        jobs = [self._pool.submit(_csr_kernel, *args, part, *rest, self.R[t]) for t, part in enumerate(parts)]
        for t, (job, part) in enumerate(zip(jobs, parts, strict=True)):
            job.result()
            self.n_raw[t] += len(part)

    def close(self) -> None:
        """Stop the accumulator's worker threads, if any."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def add_dense(self, block, rows: np.ndarray | slice) -> None:
        """Add a dense block of cells x (all columns), in float64, centring its sums of squares on its mean."""
        B = np.asarray(block)
        if not self.all_genes:
            B = B[:, self.genes]
        B = np.asarray(B, dtype=np.float64)
        nb = B.shape[0]
        if nb == 0:
            return
        codes = self.codes[rows]
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        self.S[sorted_codes[starts]] += np.add.reduceat(B[order], starts, axis=0)
        if self.Xc.shape[1]:
            self.XtYc_dense += B.T @ self.Xc[rows]
        mean_b = B.mean(axis=0)
        B = B - mean_b  # a new array: B may be a view of the caller's data
        M2_b = np.einsum("ij,ij->j", B, B)
        self.n_centred = merge_moments(self.mean, self.M2, self.n_centred, mean_b, M2_b, nb)

    def result(self) -> SuffStats:
        """The accumulated :class:`SuffStats` (shares the donor-sum array; the accumulator is spent)."""
        G = self.S.shape[1]
        self.close()
        mean, M2, n = np.zeros(G), np.zeros(G), 0
        parts = [(R, n_t) for R, n_t in zip(self.R, self.n_raw, strict=True) if n_t]
        parts = [(*_raw_moments(R, n_t), n_t) for R, n_t in parts]
        if self.n_centred:
            parts.append((self.mean, self.M2, self.n_centred))
        for mean_t, M2_t, n_t in parts:  # pairwise merge of the threads' and the dense chunks' moments
            if n == 0:
                mean, M2, n = mean_t.copy(), M2_t.copy(), n_t
            else:
                n = merge_moments(mean, M2, n, mean_t, M2_t, n_t)
        return SuffStats(S=self.S, XtY=self._xty(), mean=mean, M2=M2, n_cells=n)

    def _xty(self) -> np.ndarray:
        p = self.X.shape[1]
        G = self.S.shape[1]
        XtY = np.empty((p, G))
        XtYc = self.XtYc_dense.copy()
        for R in self.R:
            XtYc += R[:, XTY0:]
        XtY[~self.donor_cols] = XtYc.T
        if self.donor_cols.any():
            XtY[self.donor_cols] = self.donor_values().T @ self.S
        return XtY

    def donor_values(self) -> np.ndarray:
        """Donor-level values (donors x donor columns) of the donor-level design columns."""
        out = np.zeros((self.n_donors, int(self.donor_cols.sum())))
        out[self.codes] = self.X[:, self.donor_cols]
        return out


def sufficient_stats(
    Y,
    genes: np.ndarray,
    donors: Donors,
    X: np.ndarray,
    *,
    block_elements: int | None = None,
    prefetch: bool = True,
    n_threads: int | None = None,
) -> SuffStats:
    """One pass over ``Y[:, genes]`` (dense, sparse or backed), never holding more than one chunk.

    In-memory sparse input is read in place; backed input in chunks of about ``block_elements`` stored values
    (default :data:`~._read.BLOCK_ELEMENTS`), the next one read in a background thread while the current one is
    summed, by ``n_threads`` threads (default: the BLAS thread limit in effect). Dask input takes
    :func:`._dask.dask_sufficient_stats` instead (the caller chooses).
    """
    genes = np.asarray(genes, dtype=np.int64)
    n_threads = available_threads() if n_threads is None else max(1, int(n_threads))
    acc = Accumulator(donors.codes, len(donors.ids), X, genes, Y.shape[1], n_threads=n_threads)
    waiting = summing = 0.0
    n_chunks = n_values = 0
    chunks = iter_chunks(Y, block_elements=block_elements, prefetch=prefetch, reuse_buffers=True)
    try:
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            t1 = time.perf_counter()
            if chunk is None:
                break
            acc.add(chunk)
            waiting += t1 - t0
            summing += time.perf_counter() - t1
            n_chunks += 1
            n_values += chunk.array.size if chunk.kind == "dense" else len(chunk.data)
    finally:
        acc.close()
    stats = acc.result()
    logg.debug(
        f"    sufficient statistics: {n_values:,} stored values in {n_chunks} chunk(s), {n_threads} thread(s); "
        f"reading (not overlapped) {waiting:.2f} s, summing {summing:.2f} s"
    )
    stats.n_cells = int(X.shape[0])
    return stats


# ------------------------------------------------------------------------------------------------------------
# OLS pre-residuals
# ------------------------------------------------------------------------------------------------------------


def scaled_cholesky(XtX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``L`` (lower) and ``s`` with ``diag(s) XtX diag(s) = L L'`` and unit diagonal before factoring.

    Scaling the columns first keeps covariates on very different scales (ages, positions in bp) from making an
    otherwise well-posed design numerically singular.
    """
    d = np.diag(XtX)
    if not (np.all(np.isfinite(XtX)) and np.all(d > 0)):
        raise ValueError("the design matrix has a constant-zero or non-finite column.")
    scale = 1.0 / np.sqrt(d)
    try:
        L = linalg.cholesky(XtX * scale[:, None] * scale[None, :], lower=True, check_finite=False)
    except linalg.LinAlgError as err:
        raise ValueError("the design matrix is numerically singular (collinear covariates).") from err
    return L, scale


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


def pre_residualise(stats: SuffStats, donors: Donors, spectral: Spectral) -> PreResiduals:
    """OLS residuals' sufficient statistics from the raw ones; genes with nothing to fit are flagged.

    Works in place: ``T`` reuses the memory of ``stats.S``, which must not be used afterwards.
    """
    c = donors.counts
    ZtX = spectral.ZtX
    colsum = ZtX.sum(axis=0)
    # a non-finite value anywhere in a gene makes its sum of squares non-finite, so S needs no separate check
    finite = np.isfinite(stats.M2) & np.isfinite(stats.XtY).all(axis=0) & np.isfinite(stats.mean)
    Xyc = stats.XtY - colsum[:, None] * stats.mean[None, :]
    L, scale = scaled_cholesky(spectral.XtX)
    b0 = scale[:, None] * linalg.cho_solve((L, True), scale[:, None] * Xyc, check_finite=False)
    rr = stats.M2 - np.einsum("pg,pg->g", Xyc, b0)
    T = stats.S
    stats.S = None
    between = np.zeros(T.shape[1])  # sum_d T_dg^2 / c_d
    fitted_by = np.hstack([c[:, None], ZtX])  # T = S - [c, Z'X] [mean; b0]: one GEMM per block
    coef = np.vstack([stats.mean[None, :], b0])
    for a in range(0, T.shape[0], 64):  # row blocks: no temporary of T's size, one pass while in cache
        blk = T[a : a + 64]
        blk -= fitted_by[a : a + 64] @ coef
        between += np.einsum("dg,dg,d->g", blk, blk, 1.0 / c[a : a + 64])
    W = rr - between
    if np.all(c == 1):
        W = np.zeros_like(W)
    W = np.maximum(W, 0.0)

    scale = np.where(finite, stats.M2 + stats.n_cells * stats.mean**2, 0.0)
    ok = finite & (rr > 1e-10 * scale) & (stats.M2 > 0)
    rr = np.where(ok, rr, np.nan)
    return PreResiduals(mean=stats.mean, b0=b0.T.copy(), rr=rr, T=T, W=W, ok=ok)


def scaled_residual_sums(pre: PreResiduals, donors: Donors, ok_idx: np.ndarray) -> np.ndarray:
    """``D^-1/2 Z'r`` of the genes ``ok_idx`` (donors x genes), releasing ``pre.T``.

    In place (no copy) when every gene is kept; otherwise one copy of the kept columns.
    """
    T = pre.T
    pre.T = None
    if len(ok_idx) != T.shape[1]:
        T = T[:, ok_idx]
    T /= np.sqrt(donors.counts)[:, None]
    return T
