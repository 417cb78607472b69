"""Step 1 of the pipeline: where the expression matrix comes from, read in chunks of its own layout."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from .._utils import is_dask

if TYPE_CHECKING:
    from anndata import AnnData

#: Target size of one chunk of the expression matrix held in memory at a time: elements for dense storage,
#: stored non-zeros for sparse storage.
BLOCK_ELEMENTS = 1 << 23


def available_threads() -> int:
    """Threads this call may use: the BLAS thread limit in effect (``fit_null(n_threads=...)`` sets it)."""
    try:
        from threadpoolctl import threadpool_info

        counts = [int(info["num_threads"]) for info in threadpool_info() if info.get("user_api") == "blas"]
    except Exception:  # introspection only; fall back to one thread
        counts = []
    return max(1, min(counts)) if counts else 1


def get_expression(adata: AnnData, layer: str | None):
    """Return the expression matrix (cells x genes) without copying or loading it."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; pass `layer=` to name the layer that holds expression.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())}).")
    return adata.layers[layer]


def _is_sparse(Y) -> bool:
    return sparse.issparse(Y)


def _is_backed_sparse(Y) -> bool:
    # anndata's on-disk CSR/CSC datasets (backed mode or ``sparse_dataset``)
    return hasattr(Y, "format") and hasattr(Y, "to_memory") and not _is_sparse(Y)


def describe_matrix(Y) -> str:
    """A short human-readable description of the input's storage, for logs and params."""
    if is_dask(Y):
        return "dask"
    if _is_backed_sparse(Y):
        return f"backed {Y.format}"
    if _is_sparse(Y):
        return Y.format
    if hasattr(Y, "id") and hasattr(Y, "file"):  # h5py.Dataset
        return "backed dense"
    return "dense"


@dataclass
class Chunk:
    """A piece of the expression matrix, in the storage's own layout.

    ``kind`` is ``"csr"`` (cells ``start:stop``, all genes), ``"csc"`` (genes ``start:stop``, all cells) or
    ``"dense"`` (cells ``start:stop``, all genes). Sparse chunks carry ``indptr`` (from 0), ``indices`` and
    ``data`` without a copy where the storage allows it; dense chunks carry ``array``.
    """

    kind: str
    start: int
    stop: int
    indptr: np.ndarray | None = None
    indices: np.ndarray | None = None
    data: np.ndarray | None = None
    array: np.ndarray | None = None


def _resolve_block(block_elements: int | None) -> int:
    value = BLOCK_ELEMENTS if block_elements is None else int(block_elements)
    if value < 1:
        raise ValueError(f"block_elements must be a positive integer, not {block_elements!r}.")
    return value


def iter_chunks(
    Y, *, block_elements: int | None = None, prefetch: bool = True, reuse_buffers: bool = False
) -> Iterator[Chunk]:
    """Yield the whole of ``Y`` (in memory or backed; not dask) as :class:`Chunk` objects.

    In-memory sparse matrices come as a single chunk that shares their arrays (no copy). Backed sparse
    matrices are read in chunks of about ``block_elements`` stored non-zeros along their major axis, and dense
    ones in row chunks of about ``block_elements`` entries; with ``prefetch`` the next chunk of a backed matrix
    is read in a background thread while the current one is processed. With ``reuse_buffers``, backed sparse
    chunks are read into two alternating buffers (no fresh memory per chunk): a chunk is then valid only until
    the next-but-one is requested, so callers must not keep them.
    """
    step_elements = _resolve_block(block_elements)
    if is_dask(Y):
        raise ValueError("iter_chunks does not read dask arrays; use the dask map-reduce in _dask.py.")
    if _is_sparse(Y):
        if Y.format not in ("csr", "csc"):
            Y = Y.tocsr()
        n_major = Y.shape[0] if Y.format == "csr" else Y.shape[1]
        yield Chunk(Y.format, 0, n_major, np.asarray(Y.indptr), np.asarray(Y.indices), np.asarray(Y.data))
        return
    if _is_backed_sparse(Y):
        yield from _prefetched(_backed_sparse_chunks(Y, step_elements, reuse_buffers), prefetch)
        return
    if hasattr(Y, "id") and hasattr(Y, "file"):  # h5py.Dataset: backed dense
        yield from _prefetched(_dense_chunks(Y, step_elements), prefetch)
        return
    yield from _dense_chunks(Y, step_elements)


def _dense_chunks(Y, step_elements: int) -> Iterator[Chunk]:
    n_cells, n_genes = Y.shape
    step = max(1, step_elements // max(n_genes, 1))
    for a in range(0, n_cells, step):
        b = min(n_cells, a + step)
        block = Y[a:b]
        if hasattr(block, "toarray") and not isinstance(block, np.ndarray):
            block = block.toarray()
        yield Chunk("dense", a, b, array=np.asarray(block))


def major_ranges(indptr: np.ndarray, step_elements: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of the major axis holding about ``step_elements`` stored entries each."""
    n_major = len(indptr) - 1
    a = 0
    while a < n_major:
        target = indptr[a] + step_elements
        b = int(np.searchsorted(indptr, target, side="right")) - 1
        b = min(n_major, max(b, a + 1))
        yield a, b
        a = b


def _backed_sparse_chunks(Y, step_elements: int, reuse_buffers: bool = False) -> Iterator[Chunk]:
    group = Y.group
    indptr = np.asarray(group["indptr"][:], dtype=np.int64)
    data, indices = group["data"], group["indices"]
    ranges = list(major_ranges(indptr, step_elements))
    direct = reuse_buffers and hasattr(data, "read_direct") and hasattr(indices, "read_direct")  # h5py
    if direct:
        size = max((int(indptr[b] - indptr[a]) for a, b in ranges), default=0)
        buffers = [(np.empty(size, dtype=indices.dtype), np.empty(size, dtype=data.dtype)) for _ in range(2)]
    for k, (a, b) in enumerate(ranges):
        lo, hi = int(indptr[a]), int(indptr[b])
        if direct and hi > lo:
            idx_buf, val_buf = buffers[k % 2]
            indices.read_direct(idx_buf, np.s_[lo:hi], np.s_[0 : hi - lo])
            data.read_direct(val_buf, np.s_[lo:hi], np.s_[0 : hi - lo])
            idx, val = idx_buf[: hi - lo], val_buf[: hi - lo]
        else:
            idx, val = np.asarray(indices[lo:hi]), np.asarray(data[lo:hi])
        yield Chunk(Y.format, a, b, indptr[a : b + 1] - lo, idx, val)


def _prefetched(chunks: Iterator[Chunk], prefetch: bool) -> Iterator[Chunk]:
    """Read the next chunk in a background thread while the caller processes the current one."""
    if not prefetch:
        yield from chunks
        return
    from concurrent.futures import ThreadPoolExecutor

    sentinel = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snf-read") as pool:
        pending = pool.submit(next, chunks, sentinel)
        while True:
            chunk = pending.result()
            if chunk is sentinel:
                return
            pending = pool.submit(next, chunks, sentinel)
            yield chunk


def read_columns(Y, idx: np.ndarray) -> sparse.csc_matrix:
    """The genes ``idx`` of ``Y`` (cells x genes, any supported storage) as an in-memory CSC matrix.

    Dense storage is read (and sparsified) only for those columns; backed and dask matrices are read through
    their own column selection. Used by the count families, which fit genes in batches (through
    :class:`ColumnReader`, which reads an in-memory CSR matrix's batches in one pass over it in all).
    """
    idx = np.asarray(idx, dtype=np.int64)
    if is_dask(Y):
        block = Y[:, idx].compute()
    elif _is_sparse(Y):
        block = Y[:, idx] if Y.format == "csc" else Y.tocsr()[:, idx]
    elif _is_backed_sparse(Y):
        block = Y[:, idx]
    else:  # numpy or h5py (idx is increasing, as h5py needs)
        block = Y[:, idx]
    if sparse.issparse(block):
        return sparse.csc_matrix(block)
    return sparse.csc_matrix(np.asarray(block))


class ColumnReader:
    """``reader(idx)``: :func:`read_columns` of ``Y``, for batches of genes read one after another.

    An in-memory CSR matrix with sorted indices keeps, per cell, where the last batch's scan of its row stopped:
    batches of increasing genes then visit every stored value once in all, where a column selection scans the whole
    matrix per batch. Other storage goes through :func:`read_columns`.
    """

    def __init__(self, Y):
        self.Y = Y
        self._cursor = None
        if _is_sparse(Y) and Y.format == "csr" and Y.has_sorted_indices:
            self._indptr = np.asarray(Y.indptr, dtype=np.int64)
            self._cursor = self._indptr[:-1].copy()
            self._rptr = np.empty(Y.shape[0] + 1, dtype=np.int64)
            self._tcol = np.empty(0, dtype=np.int64)  # the batch's row-major copy, kept for the next batch
            self._tdat = np.empty(0, dtype=Y.data.dtype)

    def __call__(self, idx: np.ndarray) -> sparse.csc_matrix:
        idx = np.asarray(idx, dtype=np.int64)
        if self._cursor is None or not len(idx) or (np.diff(idx) <= 0).any():
            return read_columns(self.Y, idx)
        from ._read_kernels import csr_columns_scan, csr_columns_transpose

        Y = self.Y
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        pos = np.full(hi - lo, -1, dtype=np.int64)
        pos[idx - lo] = np.arange(len(idx))
        count = np.empty(len(idx) + 1, dtype=np.int64)
        cursor = self._cursor.copy()
        m = csr_columns_scan(self._indptr, Y.indices, Y.data, cursor, lo, hi, pos, self._tcol, self._tdat,
                             self._rptr, count)  # fmt: skip
        if m > len(self._tcol):  # the buffers were too small: again with room for this batch and a larger one
            size = int(1.25 * m) + 1
            self._tcol, self._tdat = np.empty(size, dtype=np.int64), np.empty(size, dtype=Y.data.dtype)
            cursor = self._cursor.copy()
            csr_columns_scan(self._indptr, Y.indices, Y.data, cursor, lo, hi, pos, self._tcol, self._tdat,
                             self._rptr, count)  # fmt: skip
        self._cursor = cursor
        rows = np.empty(m, dtype=np.int32 if Y.shape[0] < np.iinfo(np.int32).max else np.int64)
        data = np.empty(m, dtype=Y.data.dtype)
        csr_columns_transpose(self._tcol, self._tdat, self._rptr, count, rows, data)
        return sparse.csc_matrix((data, rows, count), shape=(Y.shape[0], len(idx)))
