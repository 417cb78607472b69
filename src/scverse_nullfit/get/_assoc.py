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
    return _genes_of(table, adata, genes)


def _genes_of(table: pd.DataFrame, adata: AnnData, genes) -> pd.DataFrame:
    """The rows of a long table (stored in uns) of the genes still in ``adata`` (uns does not follow gene
    subsetting; var does), then of ``genes``; a copy with a fresh index."""
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
def cis_genes_df(
    adata: AnnData, key: str = "cis", *, tested_only: bool = False, fdr: float | None = None
) -> pd.DataFrame:
    """The per-gene summary of :func:`scverse_nullfit.tl.cis_map` as a DataFrame.

    Parameters
    ----------
    {doc_cis_result}
    tested_only
        Keep only the genes with at least one variant in their window.
    fdr
        Call eGenes at this false discovery rate instead of the ``fdr`` of the ``cis_map`` call: ``is_egene`` is
        recomputed from the stored q-values of the call's ``gene_pval`` (the independent signals stored by
        ``cis_map(independent=True)`` stay those of the call's ``fdr``).

    Returns
    -------
    A copy of ``adata.varm[key]``, indexed by gene: ``n_variants``, ``pval_acat`` (ACAT gene-level p-value),
    ``top_variant``, ``top_pos``, ``top_distance``, ``top_z``, ``top_beta``, ``top_se``, ``top_pval``,
    ``top_pval_bonf``, ``qval`` and ``qval_bonf`` (q-values of ``pval_acat`` and ``top_pval_bonf`` across the
    tested genes) and ``is_egene``.
    """
    if key not in adata.varm:
        raise KeyError(f"no cis-mapping results under adata.varm[{key!r}]; run snf.tl.cis_map(adata, genotypes).")
    df = adata.varm[key]
    if not isinstance(df, pd.DataFrame) or "pval_acat" not in df.columns:
        raise ValueError(f"adata.varm[{key!r}] is not the per-gene table cis_map stores.")
    check_current(adata, key)
    out = df.copy()
    out.index = adata.var_names.copy()
    if fdr is not None:
        if not (np.isscalar(fdr) and 0 < fdr < 1):
            raise ValueError(f"fdr must be a number strictly between 0 and 1, not {fdr!r}.")
        params = adata.uns.get(key, {}).get(Key.PARAMS, {}) if isinstance(adata.uns.get(key), dict) else {}
        column = "qval_bonf" if params.get("gene_pval") == "bonf" else "qval"
        if column not in out.columns:
            raise ValueError(f"adata.varm[{key!r}] has no {column!r}; re-run snf.tl.cis_map.")
        q = out[column].to_numpy(dtype=np.float64)
        out["is_egene"] = np.isfinite(q) & (q <= fdr)
    if tested_only:
        out = out[np.asarray(out["n_variants"] > 0)]
    return out


@doc_params(doc_cis_result=doc_cis_result)
def cis_independent_df(adata: AnnData, key: str = "cis", *, genes: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The independent signals of ``cis_map(..., independent=True)`` as a DataFrame.

    Parameters
    ----------
    {doc_cis_result}
    genes
        A gene name or names to keep (default: every eGene).

    Returns
    -------
    A copy of the table, one row per signal of each eGene: ``gene``, ``rank``, ``variant``, ``chrom``, ``pos``,
    ``distance``, the variant columns ``ref`` ... ``n_cells`` of ``cis_df``, the conditional score-test columns
    ``score``, ``score_var``, ``z``, ``pval``, ``beta``, ``se`` (conditioning on the gene's other signals),
    ``pval_gene`` and ``n_conditioned``, with a fresh integer index.
    """
    results = _cis_results(adata, key)
    if Key.CIS_INDEPENDENT not in results:
        raise KeyError(
            f"adata.uns[{key!r}] has no independent signals; run snf.tl.cis_map(adata, genotypes, "
            f"key_added={key!r}, independent=True)."
        )
    return _genes_of(results[Key.CIS_INDEPENDENT], adata, genes)


def trans_df(adata: AnnData, key: str = "trans", *, genes: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The associations kept by :func:`scverse_nullfit.tl.trans_map` as a DataFrame.

    Parameters
    ----------
    adata
        An AnnData on which :func:`~scverse_nullfit.tl.trans_map` has been run (possibly read back from h5ad).
    key
        The ``key_added`` of that call.
    genes
        A gene name or names to keep (default: all genes).

    Returns
    -------
    A copy of the table, one row per (gene, variant) pair below the call's ``pval_threshold``: ``gene``,
    ``variant``, the variant's ``chrom`` and ``pos`` when known, ``ref``, ``alt``, ``af``, ``ma_samples``,
    ``ma_count``, ``n_donors``, ``n_cells``, ``score``, ``score_var``, ``z``, ``pval``, ``beta``, ``se``, with a
    fresh integer index. The per-gene minima are in ``adata.varm[key]``, the per-variant
    minima in ``adata.uns[key]["variants"]``.
    """
    hint = f"run snf.tl.trans_map(adata, genotypes, key_added={key!r})"
    if key not in adata.uns or not isinstance(adata.uns[key], dict) or Key.TRANS_PAIRS not in adata.uns[key]:
        raise KeyError(f"no trans-mapping results under adata.uns[{key!r}]; {hint}.")
    stored = adata.uns[key]
    table = stored[Key.TRANS_PAIRS]
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"adata.uns[{key!r}]['associations'] is a {type(table).__name__}, not a DataFrame.")
    what = f"the trans-mapping results under {key!r}"
    check_cells(adata, stored.get(CELLS), what, f"Re-run snf.tl.trans_map(adata, genotypes, key_added={key!r})")
    check_source(adata, stored.get(SOURCE), what)
    return _genes_of(table, adata, genes)
