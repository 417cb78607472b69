"""Dask: the sufficient statistics as a map-reduce over cell chunks, and gene chunks fitted on workers.

Requires the optional ``dask`` extra (``pip install 'scverse-nullfit[dask]'``). The map-reduce runs on whatever
dask scheduler is current (threads by default, a ``dask.distributed`` cluster when a client is active); the gene
fits go to the workers only when a ``distributed`` client is active.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import sparse

from .._utils import cpu_count
from ._design import Donors
from ._read import Chunk
from ._reml import GeneFits, Rotation, fit_chunk
from ._suffstats import Accumulator, SuffStats, donor_level_columns

#: Partial statistics merged per reduce task.
SPLIT_EVERY = 4


def _require_dask():
    try:
        import dask  # noqa: F401
    except ImportError as err:  # pragma: no cover - dask is installed in the test environment
        raise ImportError(
            "dask-backed expression needs the optional dask dependencies: pip install 'scverse-nullfit[dask]'."
        ) from err


def distributed_client():
    """The active ``dask.distributed`` client, or None (also when ``distributed`` is not installed)."""
    import sys

    if "distributed" not in sys.modules:  # no client can exist: do not pay for importing distributed
        return None
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def _as_chunk(block, start: int) -> Chunk:
    """A dask block of cells (numpy, scipy sparse, or anything with ``tocsr``/``todense``) as a row chunk."""
    if sparse.issparse(block):
        block = block if block.format == "csr" else block.tocsr()
        return Chunk("csr", start, start + block.shape[0], np.asarray(block.indptr), np.asarray(block.indices),
                     np.asarray(block.data))  # fmt: skip
    if hasattr(block, "tocsr") and not isinstance(block, np.ndarray):  # e.g. pydata sparse
        return _as_chunk(sparse.csr_matrix(block.tocsr()), start)
    if hasattr(block, "todense") and not isinstance(block, np.ndarray):
        block = block.todense()
    block = np.asarray(block)
    return Chunk("dense", start, start + block.shape[0], array=block)


def partial_stats(codes, X, genes, n_vars: int, n_donors: int, donor_cols, *blocks) -> SuffStats:
    """The map: sufficient statistics of consecutive blocks of cells (each with all the matrix's columns).

    ``codes`` and ``X`` cover the cells of all ``blocks``, in order; the blocks are summed one at a time.
    """
    acc = Accumulator(codes, n_donors, X, genes, n_vars, donor_cols=donor_cols)
    start = 0
    for block in blocks:
        chunk = _as_chunk(block, start)
        acc.add(chunk)
        start = chunk.stop
    return acc.result()


def merge_stats(*parts: SuffStats) -> SuffStats:
    """The reduce: statistics of the union of disjoint cell sets (a new object; the inputs are untouched)."""
    first = parts[0]
    out = SuffStats(S=first.S.copy(), XtY=first.XtY.copy(), mean=first.mean.copy(), M2=first.M2.copy(),
                    n_cells=first.n_cells)  # fmt: skip
    for part in parts[1:]:
        out.merge(part)
    return out


def _parallelism() -> int:
    client = distributed_client()
    if client is not None:
        workers = client.scheduler_info().get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    return cpu_count()


def _groups(chunks: tuple[int, ...], n_cols: int, *, dense: bool) -> list[tuple[int, int]]:
    """Consecutive runs of cell blocks summed by one task each (``[first, stop)`` block indices).

    Every task's partial statistics hold a donors x genes array, so tasks are few: ``4 * parallelism``, or more
    when needed to keep a task's blocks (all in memory while it runs, summed one at a time) near ``2**23`` dense
    or ``2**26`` sparse cells x genes.
    """
    n_cells = int(sum(chunks))
    per_task = 1 << (23 if dense else 26)
    n_tasks = min(len(chunks), max(4 * _parallelism(), -(-n_cells * n_cols // per_task)))
    bounds = np.searchsorted(np.cumsum(chunks), np.linspace(0, n_cells, n_tasks + 1)[1:-1], side="left") + 1
    edges = [0, *sorted(set(int(b) for b in bounds if 0 < b < len(chunks))), len(chunks)]
    return list(itertools.pairwise(edges))


def dask_sufficient_stats(Y, genes: np.ndarray, donors: Donors, X: np.ndarray) -> SuffStats:
    """Map-reduce of the sufficient statistics over the cell chunks of a dask array, on the current scheduler."""
    _require_dask()
    import dask
    from dask import delayed

    if Y.numblocks[1] > 1:
        Y = Y.rechunk({1: -1})
    n_donors = len(donors.ids)
    donor_cols = donor_level_columns(X, donors.codes, n_donors)
    starts = np.concatenate([[0], np.cumsum(Y.chunks[0])]).astype(np.int64)
    blocks = Y.to_delayed().ravel()
    genes = np.asarray(genes, dtype=np.int64)
    n_vars = Y.shape[1]
    mapper = delayed(partial_stats, pure=True)
    parts = []
    dense = not (sparse.issparse(Y._meta) or hasattr(Y._meta, "tocsr"))
    for first, stop in _groups(Y.chunks[0], n_vars, dense=dense):
        a, b = starts[first], starts[stop]
        parts.append(mapper(donors.codes[a:b], X[a:b], genes, n_vars, n_donors, donor_cols, *blocks[first:stop]))
    reducer = delayed(merge_stats, pure=True)
    while len(parts) > 1:
        parts = [reducer(*parts[i : i + SPLIT_EVERY]) for i in range(0, len(parts), SPLIT_EVERY)]
    (stats,) = dask.compute(parts[0])
    stats.n_cells = int(X.shape[0])
    return stats


def _fit_remote(problem, U, Tt, W, tau):
    return fit_chunk(problem, Rotation(U, Tt)(slice(None)), W, tau=tau)


def fit_genes_distributed(client, problem, rotation, W: np.ndarray, *, tau, chunk_size: int, progress=None):
    """Fit gene chunks on the workers of a ``distributed`` client; results in gene order."""
    from distributed import as_completed

    G, n, p = len(W), len(problem.lam), problem.p
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    size = int(min(max(chunk_size, -(-G // (4 * n_workers))), max(G, 1)))
    problem_f = client.scatter(problem, broadcast=True)
    U_f = client.scatter(rotation.U, broadcast=True)
    futures = {}
    for start in range(0, G, size):
        sl = slice(start, min(G, start + size))
        Tt = np.ascontiguousarray(rotation.Tt[:, sl])
        fut = client.submit(_fit_remote, problem_f, U_f, Tt, W[sl], tau, pure=False)
        futures[fut] = sl
    out = GeneFits.empty(G, n, p)
    for fut in as_completed(list(futures)):
        sl = futures[fut]
        out.put(sl, fut.result())
        if progress is not None:
            progress.update(sl.stop - sl.start)
        fut.release()
    return out
