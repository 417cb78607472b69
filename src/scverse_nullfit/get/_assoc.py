"""DataFrame accessors for stored association results (:func:`scverse_nullfit.tl.cis_map`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._docs import doc_cis_result, doc_params
from .._provenance import CELLS, SOURCE, check_cells, check_source

if TYPE_CHECKING:
    from anndata import AnnData


def _cis_results(adata: AnnData, key: str) -> dict:
    hint = f"run snf.tl.cis_map(adata, genotypes, key_added={key!r})"
    if key not in adata.uns or not isinstance(adata.uns[key], dict) or Key.CIS_VARIANTS not in adata.uns[key]:
        raise KeyError(f"no cis-mapping results under adata.uns[{key!r}]; {hint}.")
    table = adata.uns[key][Key.CIS_VARIANTS]
    if not isinstance(table, pd.DataFrame):
        raise ValueError(
            f"adata.uns[{key!r}]['variants'] is a {type(table).__name__}, not the DataFrame cis_map stores."
        )
    check_current(adata, key)
    return adata.uns[key]


def check_current(adata: AnnData, key: str) -> None:
    """Refuse cis results computed on other cells or from an earlier null-model fit than the one stored now."""
    stored = adata.uns.get(key)
    if not isinstance(stored, dict):
        return
    what = f"the cis-mapping results under {key!r}"
    check_cells(adata, stored.get(CELLS), what, f"Re-run snf.tl.cis_map(adata, genotypes, key_added={key!r})")
    check_source(adata, stored.get(SOURCE), what)


@doc_params(doc_cis_result=doc_cis_result)
def cis_df(adata: AnnData, key: str = "cis", *, genes: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The per-variant results of :func:`scverse_nullfit.tl.cis_map` as a DataFrame.

    Parameters
    ----------
    {doc_cis_result}
    genes
        A gene name or names to keep (default: all tested genes).

    Returns
    -------
    A copy of the table, one row per gene of ``adata`` (after any gene subsetting) and cis variant: ``gene``,
    ``variant``, ``chrom``, ``pos``,
    ``distance``, ``score``, ``score_var``, ``z``, ``pval``, ``beta``, ``se`` (see
    :func:`~scverse_nullfit.tl.score_test` for their definitions), with a fresh integer index.
    """
    table = _cis_results(adata, key)[Key.CIS_VARIANTS]
    # the per-variant table lives in uns, which anndata does not subset with the genes: follow var here
    present = table["gene"].astype(str).isin(adata.var_names).to_numpy()
    if not present.all():
        table = table[present]
        if isinstance(table["gene"].dtype, pd.CategoricalDtype):
            table = table.assign(gene=table["gene"].cat.remove_unused_categories())
    if genes is not None:
        wanted = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        unknown = [g for g in wanted if g not in adata.var_names]
        if unknown:
            raise KeyError(f"genes not in adata.var_names: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}.")
        table = table[table["gene"].astype(str).isin(wanted).to_numpy()]
    return table.reset_index(drop=True).copy()


@doc_params(doc_cis_result=doc_cis_result)
def cis_genes_df(adata: AnnData, key: str = "cis", *, tested_only: bool = False) -> pd.DataFrame:
    """The per-gene summary of :func:`scverse_nullfit.tl.cis_map` as a DataFrame.

    Parameters
    ----------
    {doc_cis_result}
    tested_only
        Keep only the genes with at least one variant in their window.

    Returns
    -------
    A copy of ``adata.varm[key]``, indexed by gene: ``n_variants``, ``pval_acat`` (ACAT gene-level p-value),
    ``top_variant``, ``top_pos``, ``top_distance``, ``top_z``, ``top_beta``, ``top_se``, ``top_pval``,
    ``top_pval_bonf``.
    """
    if key not in adata.varm:
        raise KeyError(f"no cis-mapping results under adata.varm[{key!r}]; run snf.tl.cis_map(adata, genotypes).")
    df = adata.varm[key]
    if not isinstance(df, pd.DataFrame) or "pval_acat" not in df.columns:
        raise ValueError(f"adata.varm[{key!r}] is not the per-gene table cis_map stores.")
    check_current(adata, key)
    out = df.copy()
    out.index = adata.var_names.copy()
    if tested_only:
        out = out[np.asarray(out["n_variants"] > 0)]
    return out
