"""Where the fit runs: the in-process or the dask functions of ``_core``, chosen from the input and the session."""

from __future__ import annotations

import numpy as np

from .._core._dask import dask_sufficient_stats, distributed_client, fit_genes_distributed
from .._core._reml import GeneFits, RemlProblem, Rotation, default_chunk_size, fit_genes
from .._core._suffstats import sufficient_stats
from .._utils import is_dask


def compute_sufficient_stats(Y, genes: np.ndarray, donors, X: np.ndarray, *, n_threads: int | None = None, slots=None):
    """The sufficient statistics of ``Y[:, genes]``: a dask map-reduce for dask input, else one streamed pass in
    ``n_threads`` threads (each run of donors holding one of ``slots``, if given)."""
    if is_dask(Y):
        return dask_sufficient_stats(Y, genes, donors, X)
    return sufficient_stats(Y, genes, donors, X, n_threads=n_threads, slots=slots)


def fit_all_genes(
    problem: RemlProblem, rotate: Rotation, W: np.ndarray, *, tau, distributed: bool = False, progress=None, **kwargs
) -> GeneFits:
    """REML of every gene: on the workers of the active ``dask.distributed`` client when ``distributed`` (the
    caller's explicit choice: dask input) and there is more than one chunk of genes, else in threads of this
    process. A client that merely exists is never used for in-memory input."""
    chunk_size = kwargs.get("chunk_size") or default_chunk_size(len(problem.lam), len(W))
    client = distributed_client() if distributed else None
    if client is not None and isinstance(rotate, Rotation) and len(W) > chunk_size:
        return fit_genes_distributed(client, problem, rotate, W, tau=tau, chunk_size=chunk_size, progress=progress)
    return fit_genes(problem, rotate, W, tau=tau, progress=progress, **kwargs)
