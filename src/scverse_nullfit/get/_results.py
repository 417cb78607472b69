"""DataFrame accessors for stored results."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._docs import doc_null_result, doc_params
from .._provenance import CELLS, check_cells

if TYPE_CHECKING:
    from anndata import AnnData


@doc_params(doc_null_result=doc_null_result)
def nullfit_df(adata: AnnData, key: str = "nullfit") -> pd.DataFrame:
    """The per-gene null-model results of :func:`scverse_nullfit.tl.fit_null` as a DataFrame.

    Parameters
    ----------
    {doc_null_result}

    Returns
    -------
    A copy of ``adata.varm[key]``, indexed by gene.
    """
    if key not in adata.varm:
        raise KeyError(
            f"no null-model results under adata.varm[{key!r}]; run snf.tl.fit_null(adata, key_added={key!r}) first."
        )
    df = adata.varm[key]
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"adata.varm[{key!r}] is a {type(df).__name__}, not the DataFrame fit_null stores.")
    shared = adata.uns.get(key)
    if isinstance(shared, dict):
        check_cells(
            adata, shared.get(CELLS), f"the null-model fit under {key!r}",
            f"Re-run snf.tl.fit_null(adata, key_added={key!r})",
        )  # fmt: skip
    out = df.copy()
    out.index = adata.var_names.copy()
    if "converged" in out.columns and out["converged"].dtype != bool:  # e.g. nullable after an outer concat
        out["converged"] = out["converged"].astype("boolean").fillna(False).astype(bool)
    return out
