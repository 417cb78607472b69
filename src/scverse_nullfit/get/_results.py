"""DataFrame accessors for stored results."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._docs import doc_null_result, doc_params

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
    out = df.copy()
    out.index = adata.var_names.copy()
    return out
