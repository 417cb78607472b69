"""Per-group (e.g. per-cell-type) runs of the tools: the groups of ``obs[groupby]``, their storage keys and the
light AnnData a group is computed on (results are then written to the full AnnData, each under its own key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from collections.abc import Iterator


def group_key(key: str, group: str) -> str:
    """Where a group's result is stored: ``f"{key}_{group}"`` (a ``/`` in the label becomes ``_``, as h5ad
    keys cannot hold it)."""
    return f"{key}_{group}".replace("/", "_")


def groups_of(adata: AnnData, groupby: str) -> list[str]:
    """The groups of ``obs[groupby]`` with cells: categories in their order, else sorted values."""
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    col = adata.obs[groupby]
    if col.isna().any():
        raise ValueError(f"adata.obs[{groupby!r}] has missing values in {int(col.isna().sum())} cells.")
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(col.astype(str).unique())
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(col.astype(str).unique())


def group_cells(adata: AnnData, groupby: str, group: str) -> np.ndarray:
    """Integer positions of the cells of ``group``."""
    return np.flatnonzero(adata.obs[groupby].astype(str).to_numpy() == str(group))


def fit_subsets(adata: AnnData, groupby: str, layer: str | None, uns_keys: tuple[str, ...]) -> Iterator[tuple]:
    """``(group, cells, AnnData of those cells)`` for each group: expression (``X`` or ``layer``), ``obs``,
    ``var`` and the ``uns`` entries ``uns_keys`` only (nothing else of ``adata`` is copied)."""
    for group in groups_of(adata, groupby):
        cells = group_cells(adata, groupby, group)
        view = adata[cells]
        X = view.layers[layer] if layer is not None else view.X
        sub = AnnData(
            X=None if layer is not None else X,
            obs=view.obs.copy(),
            var=adata.var.copy(),
            layers=None if layer is None else {layer: X},
        )
        for k in uns_keys:
            if k in adata.uns:
                sub.uns[k] = adata.uns[k]
        yield group, cells, sub
