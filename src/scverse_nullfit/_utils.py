"""Small helpers shared by every layer (a leaf: imports nothing from the package)."""

from __future__ import annotations

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


def select_genes(var_names: pd.Index, genes) -> np.ndarray:
    """Boolean mask over ``var_names`` from names, a boolean mask or None."""
    if genes is None:
        return np.ones(len(var_names), dtype=bool)
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


def is_dask(Y) -> bool:
    """Whether ``Y`` is a dask array (checked without importing dask)."""
    return type(Y).__module__.startswith("dask.")
