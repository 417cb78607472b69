"""Small helpers shared by every layer (a leaf: imports nothing from the package)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd


def preview(items, k: int = 5) -> str:
    """The first ``k`` items quoted, for error messages: ``'a', 'b', ... (12 in all)``."""
    items = [str(i) for i in items]
    shown = ", ".join(repr(i) for i in items[:k])
    return f"{shown}{', ...' if len(items) > k else ''} ({len(items)} in all)"


def check_positive_int(value, name: str) -> None:
    """Reject an optional count argument that is not a positive integer (None passes)."""
    if value is not None and (int(value) != value or value < 1):
        raise ValueError(f"{name} must be a positive integer, not {value!r}.")


def check_unique_var_names(var_names: pd.Index) -> None:
    """Duplicated gene names make per-gene results ambiguous: refuse them with scanpy's advice."""
    if var_names.has_duplicates:
        dup = var_names[var_names.duplicated()].unique()
        raise ValueError(
            f"adata.var_names has duplicated gene names: {preview(dup)}; run adata.var_names_make_unique() first."
        )


def select_genes(var_names: pd.Index, genes, var: pd.DataFrame | None = None) -> np.ndarray:
    """Boolean mask over ``var_names`` from names, a boolean mask, the name of a boolean ``var`` column
    (``"highly_variable"``, as scanpy's ``mask_var``) or None (all genes)."""
    if genes is None:
        return np.ones(len(var_names), dtype=bool)
    if isinstance(genes, str) and var is not None and genes in var.columns:
        column = var[genes]
        if not pd.api.types.is_bool_dtype(column.dtype):
            raise ValueError(
                f"genes={genes!r} names a column of adata.var of dtype {column.dtype}; a gene selection column must "
                "be boolean (True for the genes to use)."
            )
        return column.fillna(False).to_numpy(dtype=bool)
    if isinstance(genes, str):
        genes = [genes]
    genes = np.asarray(genes)
    if genes.dtype == bool:
        if genes.shape != (len(var_names),):
            raise ValueError(f"genes is a boolean mask of length {len(genes)}, but adata has {len(var_names)} genes.")
        return genes.copy()
    idx = var_names.get_indexer(genes.astype(str))
    if (idx < 0).any():
        missing = [str(g) for g in genes[idx < 0]]
        raise KeyError(f"genes not in adata.var_names: {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
    mask = np.zeros(len(var_names), dtype=bool)
    mask[idx] = True
    return mask


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def resolve_threads(n_threads: int | None) -> int:
    """The thread count of a call: ``n_threads`` when given, else scanpy's ``settings.n_jobs`` when it has been set
    to something other than its default 1 (``-1`` meaning every CPU), else every CPU this process may use."""
    if n_threads is not None:
        check_positive_int(n_threads, "n_threads")
        return int(n_threads)
    from scanpy import settings

    n_jobs = settings.n_jobs
    if n_jobs is None or n_jobs == 1:
        return cpu_count()
    return cpu_count() if n_jobs < 0 else int(n_jobs)


def is_dask(Y) -> bool:
    """Whether ``Y`` is a dask array (checked without importing dask)."""
    return type(Y).__module__.startswith("dask.")


def normalise_chrom(values) -> np.ndarray:
    """Chromosome names as strings without a leading ``chr`` (any case); missing values become ``""``.

    Integer-valued numbers (``1``, ``1.0``) become ``"1"``, so numeric and string columns match.
    """
    s = pd.Series(np.asarray(values, dtype=object))
    missing = s.isna().to_numpy()
    out = np.empty(len(s), dtype=object)
    for i, v in enumerate(s.to_numpy()):
        if missing[i]:
            out[i] = ""
            continue
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)
        text = str(v).strip()
        out[i] = text[3:] if text[:3].lower() == "chr" else text
    return out
