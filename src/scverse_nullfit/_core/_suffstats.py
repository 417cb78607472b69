"""Step 3 of the pipeline: the sufficient statistics of every gene, in one pass over the cells.

Every statistic is a sum over cells, so the pass is a map-reduce: any set of cells gives partial sums
(:class:`Accumulator`), and partial sums of disjoint cells add up (:meth:`SuffStats.merge`). Sparse storage is
summed by scipy's sparse products on its own ``indptr/indices/data`` arrays (nothing to compile, never densified):
the donor sums ``Z'Y`` as one row per donor holding all its cells' values, made dense; the per-gene sums as products
with the cell-level design columns. The donor sums ``Z'y`` of donor-level design columns come from ``Z'Y`` at the
end.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from scanpy import logging as logg
from scipy import linalg, sparse

from ._design import DesignSums, Donors, Spectral
from ._read import available_threads, iter_chunks, major_ranges


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
# the pass's building blocks (numpy and scipy.sparse: nothing to compile; float64 sums whatever the storage dtype)
# ------------------------------------------------------------------------------------------------------------


#: Stored values summed at a time: runs of whole donors (CSR) or of genes (CSC). A fixed split, so that the sums do
#: not depend on the number of threads; it bounds the temporaries (a float64 copy of a run's values).
RUN_ELEMENTS = 1 << 21
#: A chunk's second moment of a gene comes from its raw sums of ``y`` and ``y^2`` unless ``E[y^2] / Var(y)`` (the
#: factor by which rounding errors are magnified) exceeds this: at most ``1 / (fraction of zeros)``, so only genes
#: with almost no zeros and a large mean are centred value by value.
RAW_RATIO = 64.0


def _float_values(data) -> np.ndarray:
    """Stored values as float32 or float64 (other dtypes are converted to float64)."""
    data = np.asarray(data)
    return data if data.dtype in (np.float32, np.float64) else data.astype(np.float64)


def _donor_runs(sorted_codes: np.ndarray, nnz: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive runs ``[a, b)`` of rows visited in donor order, each of whole donors holding about ``budget``
    stored values (``nnz`` per row): a donor starts a new run when it crosses a multiple of ``budget``."""
    n = len(sorted_codes)
    if n == 0:
        return []
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    before = np.concatenate([[0], np.cumsum(nnz)])[starts]
    window = before // max(1, int(budget))
    cuts = starts[np.flatnonzero(np.diff(window)) + 1]
    bounds = [0, *cuts.tolist(), n]
    return list(itertools.pairwise(bounds))


def _raw_moments(tot: np.ndarray, sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means and centred sums of squares over ``n`` cells from the sums of y and y^2, and the genes whose centred
    sum lost digits to cancellation (see :data:`RAW_RATIO`): those are to be centred value by value."""
    mean = tot / n
    M2 = sq - tot * mean
    return mean, M2, sq > RAW_RATIO * M2


def _put_columns(S: np.ndarray, pos: np.ndarray, St: np.ndarray) -> None:
    """``S[:, pos] = St.T``, by blocks of columns that stay in cache when ``pos`` is a range."""
    if len(pos) and pos[-1] - pos[0] == len(pos) - 1 and np.all(np.diff(pos) == 1):
        for k in range(0, len(pos), 64):
            block = St[k : k + 64]
            S[:, pos[0] + k : pos[0] + k + len(block)] = block.T
    else:
        S[:, pos] = St.T


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
    n_threads
        Threads summing the runs of a chunk (the sums do not depend on it).
    slots
        A semaphore each run holds while it is summed, shared with other work that runs beside the pass (stage 1
        holds one slot while it eigendecomposes, so the pass then uses one thread fewer, and all once it is done).
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
        slots: threading.Semaphore | None = None,
    ):
        self.n_threads = max(1, int(n_threads))
        self._slots = slots
        self._pool = None
        self.codes = np.ascontiguousarray(codes, dtype=np.int64)
        self.n_donors = int(n_donors)
        self.X = np.asarray(X, dtype=np.float64)
        self.genes = np.asarray(genes, dtype=np.int64)
        self.n_vars = int(n_vars)
        G = len(self.genes)
        self.gene_pos = np.full(self.n_vars, -1, dtype=np.int64)
        self.gene_pos[self.genes] = np.arange(G)
        self.all_genes = bool(G == self.n_vars and np.array_equal(self.genes, np.arange(self.n_vars)))
        if donor_cols is None:
            donor_cols = donor_level_columns(self.X, self.codes, self.n_donors)
        self.donor_cols = np.asarray(donor_cols, dtype=bool)
        self.Xc = np.ascontiguousarray(self.X[:, ~self.donor_cols])  # the cell-level columns
        self.cell_donor = self.codes.astype(np.int32 if self.n_donors < 2**31 else np.int64)
        self.S = np.zeros((self.n_donors, G))
        self.seen = np.zeros(self.n_donors, dtype=bool)  # donors whose rows of S hold sums already
        self.XtYc = np.zeros((G, self.Xc.shape[1]))
        # Chan-merged mean and centred sum of squares of the cells added so far
        self.mean = np.zeros(G)
        self.M2 = np.zeros(G)
        self.n_centred = 0

    def add(self, chunk, rows: np.ndarray | None = None) -> None:
        """Add one :class:`~._read.Chunk`; ``rows`` maps its cells to rows of ``codes``/``X`` (default: its range)."""
        if chunk.kind == "csc":
            if rows is not None:
                raise ValueError("a CSC chunk holds all cells; `rows` does not apply.")
            self.add_csc(chunk.indptr, chunk.indices, chunk.data, chunk.start)
            return
        if rows is None:
            rows = np.arange(chunk.start, chunk.stop)
        if chunk.kind == "csr":
            self.add_csr(chunk.indptr, chunk.indices, chunk.data, rows)
        elif chunk.kind == "dense":
            self.add_dense(chunk.array, rows)
        else:
            raise ValueError(f"unknown chunk kind {chunk.kind!r}.")

    def _map(self, fn, items: list) -> list:
        """``[fn(*item) for item in items]``, on the accumulator's threads when there are several."""
        if self.n_threads == 1 or len(items) < 2:
            return [fn(*item) for item in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="snf-sum")
        if self._slots is None:
            return list(self._pool.map(lambda item: fn(*item), items))

        def task(item):
            with self._slots:
                return fn(*item)

        return list(self._pool.map(task, items))

    def add_csr(self, indptr, indices, data, rows: np.ndarray | slice) -> None:
        """Add CSR rows (one per cell of ``rows``), summed in runs of whole donors (on concurrent threads when the
        accumulator has several; every sum is made in the same order whatever their number)."""
        rows = np.arange(len(self.codes))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        n_b = len(rows)
        if n_b == 0:
            return
        indptr = np.asarray(indptr)
        indices = np.asarray(indices)
        data = _float_values(data)
        Y = sparse.csr_matrix((data, indices, indptr), shape=(n_b, self.n_vars))
        codes = self.codes[rows]
        in_order = bool(np.all(codes[1:] >= codes[:-1]))
        order = np.arange(n_b) if in_order else np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        runs = _donor_runs(sorted_codes, np.diff(Y.indptr)[order], RUN_ELEMENTS)

        def run(a: int, b: int):
            if in_order:  # a view of the rows
                lo, hi = Y.indptr[a], Y.indptr[b]
                Yr = sparse.csr_matrix((Y.data[lo:hi], Y.indices[lo:hi], Y.indptr[a : b + 1] - lo), (b - a, Y.shape[1]))
            else:
                Yr = Y[order[a:b]]
            return self._sum_rows(Yr, sorted_codes[a:b], rows[order[a:b]])

        parts = self._map(run, runs)
        sums = parts[0]
        for part in parts[1:]:  # in run order
            sums = sums + part
        self.XtYc += sums[:, 1:-1]
        self._merge_raw(sums[:, 0], sums[:, -1], n_b, indptr, indices, data)
        self.seen[codes] = True

    def _sum_rows(self, Yr: sparse.csr_matrix, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One run of whole donors (``codes`` sorted): writes its donors' rows of S; returns each gene's sums of y,
        of y times the cell-level columns and of y^2 (genes x (2 + cell-level columns))."""
        if not self.all_genes:
            Yr = Yr[:, self.genes]
        y = np.asarray(Yr.data, dtype=np.float64)
        G = len(self.genes)
        d0, d1 = int(codes[0]), int(codes[-1]) + 1
        # one row per donor holding all its cells' values: the duplicates are summed when made dense
        by_donor = sparse.csr_matrix((y, Yr.indices, Yr.indptr[np.searchsorted(codes, np.arange(d0, d1 + 1))]),
                                     shape=(d1 - d0, G))  # fmt: skip
        if self.seen[d0:d1].any():
            sums = by_donor.toarray()
            self.S[d0:d1] += sums
        else:
            sums = by_donor.toarray(out=self.S[d0:d1])
        out = np.empty((G, self.Xc.shape[1] + 2))
        out[:, 0] = sums.sum(axis=0)
        if self.Xc.shape[1]:
            out[:, 1:-1] = sparse.csr_matrix((y, Yr.indices, Yr.indptr), shape=Yr.shape).T @ self.Xc[rows]
        # y^2 of every cell in one row, made dense
        out[:, -1] = sparse.csr_matrix((y * y, Yr.indices, [0, len(y)]), shape=(1, G)).toarray()[0]
        return out

    def _merge_raw(self, tot, sq, n_b: int, indptr, indices, data) -> None:
        """Merge a CSR chunk's moments from its raw sums; genes where those would lose digits (see
        :data:`RAW_RATIO`) are centred value by value from the chunk's stored values."""
        mean_b, M2_b, redo = _raw_moments(tot, sq, n_b)
        if redo.any():
            G = len(self.genes)
            stored = slice(int(indptr[0]), int(indptr[-1]))
            column = np.zeros(self.n_vars, dtype=bool)
            column[self.genes[redo]] = True
            idx = np.asarray(indices[stored])
            keep = column[idx]
            g = self.gene_pos[idx[keep]]
            e = np.asarray(data[stored][keep], dtype=np.float64) - mean_b[g]
            ss = np.bincount(g, weights=e * e, minlength=G)
            count = np.bincount(g, minlength=G)
            M2_b[redo] = ss[redo] + (n_b - count[redo]) * mean_b[redo] ** 2
        self.n_centred = merge_moments(self.mean, self.M2, self.n_centred, mean_b, M2_b, n_b)

    def add_csc(self, indptr, indices, data, col0: int) -> None:
        """Add CSC columns ``col0, col0 + 1, ...`` (genes over all cells), summed in runs of genes."""
        indptr = np.asarray(indptr)
        pos = self.gene_pos[col0 : col0 + len(indptr) - 1]
        Y = sparse.csc_matrix((_float_values(data), np.asarray(indices), indptr), shape=(len(self.codes), len(pos)))
        if not np.all(pos >= 0):
            keep = np.flatnonzero(pos >= 0)
            Y, pos = Y[:, keep], pos[keep]
        if len(pos) == 0:
            return
        ranges = list(major_ranges(Y.indptr, RUN_ELEMENTS))
        parts = self._map(lambda a, b: self._sum_columns(Y, pos[a:b], a, b), ranges)
        for (a, b), (mean, M2, XtYc) in zip(ranges, parts, strict=True):
            g = pos[a:b]
            self.mean[g], self.M2[g], self.XtYc[g] = mean, M2, XtYc
        self.n_centred = len(self.codes)  # every CSC chunk holds all cells (of a range of genes)
        self.seen[:] = True

    def _sum_columns(self, Y: sparse.csc_matrix, pos: np.ndarray, a: int, b: int):
        """Columns ``[a, b)`` (the genes ``pos``): writes their donor sums into S; returns their means, centred sums
        of squares and sums of y times the cell-level columns."""
        lo, hi = Y.indptr[a], Y.indptr[b]
        ptr = Y.indptr[a : b + 1] - lo
        cells = Y.indices[lo:hi]
        y = np.asarray(Y.data[lo:hi], dtype=np.float64)
        n = len(self.codes)
        # genes x donors, each gene's values summed in its own row (the duplicates are summed when made dense)
        _put_columns(self.S, pos, sparse.csr_matrix((y, self.cell_donor[cells], ptr), (b - a, self.n_donors)).toarray())
        count = np.diff(ptr)
        filled = count > 0
        starts = ptr[:-1][filled]
        tot, sq = np.zeros(b - a), np.zeros(b - a)
        if len(starts):  # each column's values are contiguous
            tot[filled] = np.add.reduceat(y, starts)
            sq[filled] = np.add.reduceat(y * y, starts)
        mean, M2, redo = _raw_moments(tot, sq, n)
        if redo.any():
            e = y - np.repeat(mean, count)
            centred = np.zeros(b - a)
            centred[filled] = np.add.reduceat(e * e, starts)
            M2[redo] = centred[redo] + (n - count[redo]) * mean[redo] ** 2
        XtYc = sparse.csr_matrix((y, cells, ptr), shape=(b - a, n)) @ self.Xc  # genes x cells, times X_c
        return mean, M2, XtYc

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
        self.seen[sorted_codes[starts]] = True
        if self.XtYc.shape[1]:
            self.XtYc += B.T @ self.Xc[rows]
        mean_b = B.mean(axis=0)
        B = B - mean_b  # a new array: B may be a view of the caller's data
        M2_b = np.einsum("ij,ij->j", B, B)
        self.n_centred = merge_moments(self.mean, self.M2, self.n_centred, mean_b, M2_b, nb)

    def result(self) -> SuffStats:
        """The accumulated :class:`SuffStats` (shares the donor-sum array; the accumulator is spent)."""
        self.close()
        return SuffStats(S=self.S, XtY=self._xty(), mean=self.mean, M2=self.M2, n_cells=self.n_centred)

    def _xty(self) -> np.ndarray:
        p = self.X.shape[1]
        G = self.S.shape[1]
        XtY = np.empty((p, G))
        XtY[~self.donor_cols] = self.XtYc.T
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
    slots: threading.Semaphore | None = None,
) -> SuffStats:
    """One pass over ``Y[:, genes]`` (dense, sparse or backed), never holding more than one chunk.

    In-memory sparse input is read in place; backed input in chunks of about ``block_elements`` stored values
    (default :data:`~._read.BLOCK_ELEMENTS`), the next one read in a background thread while the current one is
    summed, by ``n_threads`` threads (default: the BLAS thread limit in effect; ``slots``: see :class:`Accumulator`).
    Dask input takes :func:`._dask.dask_sufficient_stats` instead (the caller chooses).
    """
    genes = np.asarray(genes, dtype=np.int64)
    n_threads = available_threads() if n_threads is None else max(1, int(n_threads))
    acc = Accumulator(donors.codes, len(donors.ids), X, genes, Y.shape[1], n_threads=n_threads, slots=slots)
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
    T: np.ndarray  #: (donors, genes) scaled donor sums D^-1/2 Z'r
    W: np.ndarray  #: (genes,) within-donor sum of squares of r
    ok: np.ndarray  #: (genes,) finite, with residual variance left to fit


#: Donors per row block of :func:`pre_residualise` (a block is the unit of work of its threads).
ROW_BLOCK = 64


def pre_residualise(
    stats: SuffStats,
    donors: Donors,
    sums: DesignSums | Spectral,
    n_threads: int | None = None,
    slots: threading.Semaphore | None = None,
) -> PreResiduals:
    """OLS residuals' sufficient statistics from the raw ones, their donor sums scaled to ``D^-1/2 Z'r``; genes with
    nothing to fit are flagged. ``sums``: the design's ``Z'X`` and ``X'X`` (no eigendecomposition needed).

    Works in place: ``T`` reuses the memory of ``stats.S``, which must not be used afterwards. Row blocks of ``T`` run
    on ``n_threads`` threads (each holding one of ``slots`` while it works, if given: see :class:`Accumulator`); each
    block's share of the between-donor sum of squares is kept and the shares are added in block order, so the result
    does not depend on the thread count.
    """
    c = donors.counts
    ZtX = sums.ZtX
    colsum = ZtX.sum(axis=0)
    # a non-finite value anywhere in a gene makes its sum of squares non-finite, so S needs no separate check
    finite = np.isfinite(stats.M2) & np.isfinite(stats.XtY).all(axis=0) & np.isfinite(stats.mean)
    Xyc = stats.XtY - colsum[:, None] * stats.mean[None, :]
    L, scale = scaled_cholesky(sums.XtX)
    b0 = scale[:, None] * linalg.cho_solve((L, True), scale[:, None] * Xyc, check_finite=False)
    rr = stats.M2 - np.einsum("pg,pg->g", Xyc, b0)
    T = stats.S
    stats.S = None
    fitted_by = np.hstack([c[:, None], ZtX])  # T = S - [c, Z'X] [mean; b0]: one GEMM per block
    coef = np.vstack([stats.mean[None, :], b0])
    inv_sqrt_c = 1.0 / np.sqrt(c)
    starts = range(0, T.shape[0], ROW_BLOCK)
    between = np.empty((len(starts), T.shape[1]))  # per block: sum_d (T_dg / sqrt(c_d))^2

    def block(i: int) -> None:  # no temporary of T's size, one pass while in cache
        rows = slice(starts[i], starts[i] + ROW_BLOCK)
        with nullcontext() if slots is None else slots:
            blk = T[rows]
            blk -= fitted_by[rows] @ coef
            blk *= inv_sqrt_c[rows, None]
            np.einsum("dg,dg->g", blk, blk, out=between[i])

    n_threads = min(available_threads() if n_threads is None else max(1, int(n_threads)), len(starts))
    if n_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(n_threads, "snf-resid") as pool:
            list(pool.map(block, range(len(starts))))
    else:
        for i in range(len(starts)):
            block(i)
    W = rr - between.sum(axis=0)
    if np.all(c == 1):
        W = np.zeros_like(W)
    W = np.maximum(W, 0.0)

    scale = np.where(finite, stats.M2 + stats.n_cells * stats.mean**2, 0.0)
    ok = finite & (rr > 1e-10 * scale) & (stats.M2 > 0)
    rr = np.where(ok, rr, np.nan)
    return PreResiduals(mean=stats.mean, b0=b0.T.copy(), rr=rr, T=T, W=W, ok=ok)


def scaled_residual_sums(pre: PreResiduals, ok_idx: np.ndarray) -> np.ndarray:
    """``D^-1/2 Z'r`` of the genes ``ok_idx`` (donors x genes), releasing ``pre.T``.

    In place (no copy) when every gene is kept; otherwise one copy of the kept columns.
    """
    T = pre.T
    pre.T = None
    return T if len(ok_idx) == T.shape[1] else T[:, ok_idx]
