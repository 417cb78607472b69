"""Trans (genome-wide) eQTL mapping in bounded memory: :func:`scverse_nullfit.tl.trans_map`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._constants import Key
from .._core._step2 import BLOCK_ELEMENTS, impute
from .._docs import doc_copy, doc_n_threads, doc_params, doc_spa
from .._utils import select_genes
from ..io._genotypes import sample_options
from . import _step2 as step2

if TYPE_CHECKING:
    from anndata import AnnData

#: Default variants per chunk of a trans map.
TRANS_CHUNK = 2048


@doc_params(doc_n_threads=doc_n_threads, doc_copy=doc_copy, doc_spa=doc_spa)
def trans_map(
    adata: AnnData,
    genotypes: AnnData | pd.DataFrame | str | os.PathLike,
    *,
    pval_threshold: float = 1e-5,
    key: str = "nullfit",
    genes: Sequence[str] | np.ndarray | None = None,
    variants: pd.DataFrame | None = None,
    chunk_size: int | None = None,
    spa: bool = True,
    n_threads: int | None = None,
    key_added: str = "trans",
    copy: bool = False,
) -> AnnData | None:
    """Map trans-eQTLs: score-test every variant against every fitted gene, keeping the associations below a
    p-value threshold.

    The statistics are those of :func:`~scverse_nullfit.tl.score_test` (exact, from the stored compact
    projection). The variants are streamed from ``genotypes`` in chunks: each chunk is read, mean-imputed and
    rotated once, then tested against blocks of genes; of each block's genes x variants statistics only the
    associations with ``pval < pval_threshold`` are kept, with every gene's and every variant's smallest
    p-value. Memory is therefore bounded by ``O(gene block x chunk_size + donors x chunk_size)`` working arrays
    (a gene block is chosen so that its arrays stay near 64 MB), ``O(genes + variants)`` for the minima, and the
    kept rows: it does not grow with genes x variants. A progress bar over the variants shows at verbosity >= 2.

    Parameters
    ----------
    adata
        The AnnData on which :func:`~scverse_nullfit.tl.fit_null` was run.
    genotypes
        Donors x variants dosages (0..2), as in :func:`~scverse_nullfit.tl.score_test`: a DataFrame indexed by
        donor ID, an AnnData of donors x variants (``X`` dense, sparse or backed), a genotype file, or a genotype
        reader object (``donors``, ``var``, ``read(rows, cols)``); files are read chunk by chunk.
    pval_threshold
        Keep the (gene, variant) pairs whose p-value is below this.
    key
        The ``key_added`` of the ``fit_null`` call.
    genes
        Names or a boolean mask of the genes to test (default: all fitted genes).
    variants
        With a DataFrame of genotypes: a DataFrame indexed by variant ID with metadata (e.g. ``chrom``, ``pos``)
        to report with the associations.
    chunk_size
        Variants per chunk (default 2,048).
    {doc_spa}
    {doc_n_threads}
    key_added
        Where to store the results.
    {doc_copy}

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``, with

    ``adata.uns[key_added]["associations"]``
        The kept pairs, sorted by gene (``adata`` order), then variant (input order): ``gene``, ``variant``
        (categoricals), the variant's ``chrom`` and ``pos`` when the genotypes' variant metadata has them, the
        per-variant ``ref``, ``alt``, ``af``, ``ma_samples``, ``ma_count``, ``n_donors``, ``n_cells``, and
        ``score``, ``score_var``, ``z``, ``pval``, ``beta``, ``se`` as in :func:`~scverse_nullfit.tl.score_test`.
        Get it with :func:`scverse_nullfit.get.trans_df`.
    ``adata.uns[key_added]["variants"]``
        Per variant, indexed by variant ID: ``min_pval`` (over the tested genes), ``min_gene`` and
        ``n_associations`` (pairs kept).
    ``adata.varm[key_added]``
        Per gene: ``min_pval`` (over all variants), ``min_variant`` and ``n_associations``; genes not tested
        have NaN and 0.
    ``adata.uns[key_added]["params"]``
        The call's parameters.
    ``adata.uns[key_added]["source"]``, ``adata.uns[key_added]["cells"]``
        The null-model fit the tests used (its ``key`` and ``fit_id``) and the fingerprint of its cells:
        :func:`~scverse_nullfit.get.trans_df` refuses results from an earlier fit or on other cells.
    """
    if not (np.isscalar(pval_threshold) and 0 < pval_threshold <= 1):
        raise ValueError(f"pval_threshold must be a number in (0, 1], not {pval_threshold!r}.")
    step2.check_mapping_arguments(key, key_added, chunk_size, n_threads)
    mask = select_genes(adata.var_names, genes)
    stored = step2.StoredNull.read(adata, key)
    model = stored.compact(mask, spa=bool(spa))
    options = sample_options(genotypes, model.donors)  # only the fit's donors are read
    geno = step2.open_genotypes(genotypes, variants, **options)
    rows = geno.align(model.donors)

    n_var, n_genes = geno.n_variants, model.n_genes
    step = int(chunk_size) if chunk_size is not None else TRANS_CHUNK
    p = model.shape[1]
    gstep = int(max(1, min(model.gene_chunk(), BLOCK_ELEMENTS // ((p + 4) * min(step, max(1, n_var))))))
    start = logg.info(
        f"trans mapping of {n_var} variants against {n_genes} genes (pval_threshold={pval_threshold:g}, key={key!r})"
    )
    gene_min = np.full(n_genes, np.inf)
    gene_arg = np.full(n_genes, -1, dtype=np.intp)
    var_min = np.full(n_var, np.inf)
    var_arg = np.full(n_var, -1, dtype=np.intp)
    pieces: list[tuple[np.ndarray, ...]] = []
    info = step2.VariantInfo(geno, model.counts)
    with step2.running(n_threads, n_var, "variant", show_above=step) as bar:
        for v0 in range(0, n_var, step):
            cols = np.arange(v0, min(n_var, v0 + step))
            raw = geno.read(rows, cols)
            info.update(cols, raw)
            G, poly = impute(raw)
            if n_genes and poly.any():
                Gt = model.rotate(G, poly)
                Gt2 = Gt * Gt
                for g0 in range(0, n_genes, gstep):
                    g1 = min(n_genes, g0 + gstep)
                    S, Var = model.stats(Gt, slice(g0, g1), Gt2)
                    pval = model.pvalues(Gt, S, Var, slice(g0, g1))
                    pf = np.where(np.isfinite(pval), pval, np.inf)
                    j = np.argmin(pf, axis=1)
                    best = pf[np.arange(g1 - g0), j]
                    better = best < gene_min[g0:g1]
                    gene_min[g0:g1][better] = best[better]
                    gene_arg[g0:g1][better] = cols[j[better]]
                    i = np.argmin(pf, axis=0)
                    best = pf[i, np.arange(len(cols))]
                    better = best < var_min[cols]
                    var_min[cols[better]] = best[better]
                    var_arg[cols[better]] = g0 + i[better]
                    gi, vi = np.nonzero(pf < pval_threshold)
                    if len(gi):
                        pieces.append((g0 + gi, cols[vi], S[gi, vi], Var[gi, vi], pval[gi, vi]))
            bar.update(len(cols))
    step2.close_genotypes(geno, genotypes)  # a reader opened from a path (on an error, garbage collection closes it)

    table = _associations(adata, model.var_index, mask, geno, pieces, info)
    sel = np.flatnonzero(mask)
    genes_table = _gene_minima(adata, geno, model.var_index, gene_min, gene_arg, table)
    variants_table = pd.DataFrame(
        {
            "min_pval": np.where(np.isfinite(var_min), var_min, np.nan),
            "min_gene": pd.Categorical.from_codes(
                np.where(var_arg >= 0, np.searchsorted(sel, model.var_index[np.maximum(var_arg, 0)]), -1),
                categories=pd.Index(np.asarray(adata.var_names[sel])),
            ),
            "n_associations": np.bincount(table["variant"].cat.codes.to_numpy(), minlength=n_var).astype(np.int64),
        },
        index=geno.var.index.copy(),
    )
    params = {
        "key": key,
        "pval_threshold": float(pval_threshold),
        "spa": bool(spa) and stored.count is not None,
        "genotypes": geno.source,
        "n_genes_tested": int(n_genes),
        "n_variants": int(n_var),
        "n_associations": len(table),
    }
    entries = {Key.TRANS_PAIRS: table, Key.TRANS_VARIANTS: variants_table}
    target = step2.store_derived(adata, key_added, genes_table, entries, params, stored, copy=copy)
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    'uns[{key_added!r}][\"associations\"]', {len(table)} associations below the threshold "
            f"(DataFrame)\n    'uns[{key_added!r}][\"variants\"]', per-variant minimum p-values (DataFrame)\n"
            f"    'varm[{key_added!r}]', per-gene minimum p-values (DataFrame)"
        ),
    )
    return target if copy else None


def _associations(
    adata, var_index: np.ndarray, mask: np.ndarray, geno, pieces, info: step2.VariantInfo
) -> pd.DataFrame:
    """The kept pairs as a long table sorted by gene, then variant."""
    if pieces:
        gi, vi, S, Var, P = (np.concatenate(x) for x in zip(*pieces, strict=True))
    else:
        gi = vi = np.zeros(0, dtype=np.intp)
        S = Var = P = np.zeros(0)
    order = np.lexsort((vi, gi))
    gi, vi, S, Var, P = gi[order], vi[order], S[order], Var[order], P[order]
    sel = np.flatnonzero(mask)
    extra = {}
    for col in ("chrom", "pos"):
        if col in geno.var.columns:
            values = geno.var[col].to_numpy()[vi]
            extra[col] = pd.Categorical(values.astype(str)) if col == "chrom" else values
    return step2.result_table(
        adata.var_names[sel],
        np.searchsorted(sel, var_index[gi]),
        geno.var.index,
        vi,
        S,
        Var,
        info=info,
        pval=P,
        **extra,
    )


def _gene_minima(adata, geno, var_index, gene_min, gene_arg, table) -> pd.DataFrame:
    n = adata.n_vars
    min_pval = np.full(n, np.nan)
    found = np.isfinite(gene_min)
    min_pval[var_index[found]] = gene_min[found]
    codes = np.full(n, -1, dtype=np.int64)
    codes[var_index[found]] = gene_arg[found]
    counts = np.bincount(table["gene"].cat.codes.to_numpy(), minlength=len(table["gene"].cat.categories))
    n_assoc = pd.Series(counts, index=table["gene"].cat.categories).reindex(adata.var_names, fill_value=0)
    return pd.DataFrame(
        {
            "min_pval": min_pval,
            "min_variant": pd.Categorical.from_codes(codes, categories=geno.var.index.copy()),
            "n_associations": n_assoc.to_numpy(dtype=np.int64),
        },
        index=adata.var_names.copy(),
    )
