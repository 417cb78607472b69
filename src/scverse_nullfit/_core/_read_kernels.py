"""Compiled kernels of the column reader (:class:`._read.ColumnReader`): a batch of columns of an in-memory CSR
matrix."""

from __future__ import annotations

import numpy as np

from ._compiled import jit


@jit()
def csr_columns_scan(indptr, indices, data, cursor, lo, hi, pos, tcol, tdat, rptr, count):  # pragma: no cover
    """Copy the entries of the columns lo..hi-1 of a CSR matrix (sorted indices) that ``pos`` maps to an output
    column (``pos[j - lo]``, -1: not wanted) row by row into ``tcol`` (output column) and ``tdat``, with the rows'
    pointers ``rptr`` and the output columns' counts ``count[1:]``; returns the number of entries (only as many as
    fit are copied: the caller retries with larger buffers and the cursors as they were).

    ``cursor[r]``: where row r's scan starts, left by the previous call at its first entry at or past that call's
    ``hi``; a cursor past ``lo`` (batches out of order) is replaced by a binary search. Batches read in increasing
    order so visit every stored value once in all, each row once per batch (a cache miss: the rows lie far apart,
    hence the one pass into a row-major copy that :func:`csr_columns_transpose` turns into columns in cache)."""
    rows = indptr.shape[0] - 1
    size = tcol.shape[0]
    count[:] = 0
    m = 0
    for r in range(rows):
        rptr[r] = m
        a, e = indptr[r], indptr[r + 1]
        k = cursor[r]
        if k < a or k > e or (k > a and indices[k - 1] >= lo):
            k = a + np.searchsorted(indices[a:e], lo)
        while k < e and indices[k] < lo:
            k += 1
        while k < e and indices[k] < hi:
            j = pos[indices[k] - lo]
            if j >= 0:
                if m < size:
                    tcol[m] = j
                    tdat[m] = data[k]
                count[j + 1] += 1
                m += 1
            k += 1
        cursor[r] = k
    rptr[rows] = m
    return m


@jit()
def csr_columns_transpose(tcol, tdat, rptr, count, out_rows, out_data):  # pragma: no cover - compiled
    """The row-major copy of :func:`csr_columns_scan` as CSC: ``count`` becomes the column pointers; rows increase
    within every column."""
    n_out = count.shape[0] - 1
    for j in range(n_out):
        count[j + 1] += count[j]
    fill = count[:n_out].copy()
    for r in range(rptr.shape[0] - 1):
        for q in range(rptr[r], rptr[r + 1]):
            j = tcol[q]
            out_rows[fill[j]] = r
            out_data[fill[j]] = tdat[q]
            fill[j] += 1
