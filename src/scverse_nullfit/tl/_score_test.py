"""Exact score tests of genetic variants against stored null models: :func:`scverse_nullfit.tl.score_test`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._core._step2 import impute
from .._docs import doc_n_threads, doc_params, doc_spa, doc_variant_columns
from .._utils import check_positive_int, select_genes
from ..io._genotypes import sample_options
from ._conditional import conditional_model, conditioning_dosages
from ._step2 import StoredNull, VariantInfo, close_genotypes, open_genotypes, result_table, running

if TYPE_CHECKING:
    from anndata import AnnData


@doc_params(doc_n_threads=doc_n_threads, doc_variant_columns=doc_variant_columns, doc_spa=doc_spa)
def score_test(
    adata: AnnData,
    genotypes: pd.DataFrame | AnnData | str | os.PathLike,
    *,
    key: str = "nullfit",
    genes: Sequence[str] | np.ndarray | None = None,
    condition: Sequence[str] | pd.DataFrame | None = None,
    chunk_size: int | None = None,
    spa: bool = True,
    n_threads: int | None = None,
) -> pd.DataFrame:
    """Exact score test of every variant against every gene's fitted null model.

    For a gene with null model ``y = X b + Z u + e`` (fitted by :func:`~scverse_nullfit.tl.fit_null`) and a
    donor-level variant ``g`` (in cells ``Z g``), the score test of adding ``Z g`` as a fixed effect is

    - ``score`` ``S = (Zg)' P y``, with ``P = V^-1 - V^-1 X (X'V^-1 X)^-1 X'V^-1`` and
      ``V = sigma2_e (I + tau Z G Z')`` at the gene's fitted ``tau`` and ``sigma2_e``;
    - ``score_var`` ``Var = (Zg)' P (Zg)``, the variance of ``S`` under the null;
    - ``z = S / sqrt(Var)`` and ``pval``, its two-sided standard-normal p-value;
    - ``beta = S / Var``, the variant's effect (expression units per allele) estimated by generalised least
      squares with the null model's variance components held fixed, and ``se = 1 / sqrt(Var)`` its standard error.

    With ``condition``, the test is conditional on the donor-level variants ``C`` (in cells ``ZC``): the same
    statistics with ``P`` replaced by ``P_c = P - PZC (C'Z'PZC)^-1 C'Z'P``, the projection of the null model with
    ``ZC`` added to the covariates at the gene's fitted ``tau`` and ``sigma2_e`` (the variance components are not
    re-estimated), so that ``S_c = S - (Zg)'PZC (C'Z'PZC)^-1 C'Z'Py`` and likewise its variance; ``beta`` is then
    the variant's effect adjusted for the conditioning variants.

    These are computed exactly from the compact projection that ``fit_null`` stores (see the "Model and
    algorithm" page of the docs): ``S = g~'(w * r~)/sigma2_e`` and ``Var = [g~'(w * g~) - v'Cv]/sigma2_e`` with
    ``g~ = U' D^1/2 g``, ``w = 1/(1 + tau lam)``, ``v = X~'(w * g~)`` and ``C = (X'H^-1 X)^-1``. No expression
    data is read: the test works on an AnnData read back from h5ad whose ``X`` is gone. Each variant is rotated
    once for all genes; genes x variants are computed in matrix products, in chunks of variants.

    Parameters
    ----------
    adata
        The AnnData on which :func:`~scverse_nullfit.tl.fit_null` was run.
    genotypes
        Dosages (0..2) of the donors: a DataFrame indexed by donor ID with one column per variant, an AnnData of
        donors x variants (``obs_names`` donor IDs, ``var_names`` variant IDs; ``X`` dense, sparse or backed), or
        the path of a genotype file: VCF/BCF (``.vcf``, ``.vcf.gz``, ``.bcf``; ``DS``, else ``GT``), PLINK 2
        (``.pgen``), BGEN (``.bgen``) or PLINK 1 (``.bed``), each read in chunks through its optional package
        (see :func:`scverse_nullfit.io.read_genotypes` and the "Genotype inputs" page). Dosages count the
        ``alt`` allele. Donors are matched by ID in any order; every donor of the fit must be present (extra
        donors are ignored). Missing dosages (NaN) are replaced by the variant's mean dosage over the fit's
        donors that have one. A cellink
        ``DonorData`` (or any object whose ``.G`` is a donors x variants AnnData) stands for its ``.G``.
    key
        The ``key_added`` of the ``fit_null`` call.
    genes
        Names or a boolean mask of the genes to test (default: all genes).
    condition
        Variants to condition on: IDs of variants of ``genotypes``, or a DataFrame of dosages indexed by donor ID
        (one column per conditioning variant; every donor of the fit present). Missing dosages are mean-imputed.
        Conditioning variants without an observed dosage, monomorphic among the fit's donors, or collinear with
        the covariates or with each other (e.g. two variants in perfect linkage disequilibrium) are an error
        naming them. The conditioning variants themselves, and variants in perfect linkage disequilibrium with
        them, get NaN statistics.
    chunk_size
        Variants per chunk (default: chosen so that a chunk takes about 64 MB per array).
    {doc_spa}
    {doc_n_threads}

    Returns
    -------
    A long DataFrame with one row per gene and variant (genes in ``adata`` order, then variants in input order)
    and the columns ``gene``, ``variant`` (categoricals); the per-variant
    {doc_variant_columns};
    and the statistics ``score``, ``score_var``, ``z``, ``pval``, ``beta``, ``se``. Statistics are NaN for genes
    that were not fitted, for variants without any observed dosage or monomorphic among the fit's donors, and for
    variants collinear with the gene's covariates. ``out.attrs``
    records the fit the tests used: ``key``, ``fit_id`` and ``model`` (the family).
    """
    check_positive_int(chunk_size, "chunk_size")
    check_positive_int(n_threads, "n_threads")
    mask = select_genes(adata.var_names, genes)
    stored = StoredNull.read(adata, key)
    model = stored.compact(mask, spa=bool(spa))
    geno = open_genotypes(genotypes, **sample_options(genotypes, model.donors))
    try:
        out = _score_test(adata, geno, mask, model, key, condition, chunk_size, n_threads)
    finally:
        close_genotypes(geno, genotypes)
    out.attrs.update(stored.record())
    return out


def _score_test(adata, geno, mask, model, key, condition, chunk_size, n_threads) -> pd.DataFrame:
    rows = geno.align(model.donors)
    if condition is not None:
        cond = conditioning_dosages(condition, geno, rows, model.donors)
        model = conditional_model(model, cond)

    start = logg.info(f"score tests of {geno.n_variants} variants against {int(mask.sum())} genes (key={key!r})")
    sel = np.flatnonzero(mask)
    pos_in_sel = np.searchsorted(sel, model.var_index)
    n_sel, n_var = len(sel), geno.n_variants
    S_all = np.full((n_sel, n_var), np.nan)
    V_all = np.full((n_sel, n_var), np.nan)
    P_all = np.full((n_sel, n_var), np.nan)
    step = int(chunk_size) if chunk_size is not None else model.variant_chunk()
    info = VariantInfo(geno, model.counts)
    with running(n_threads, n_var, "variant", show_above=10 * step) as bar:
        for v0 in range(0, n_var, step):
            cols = np.arange(v0, min(n_var, v0 + step))
            raw = geno.read(rows, cols)
            info.update(cols, raw)
            G, poly = impute(raw)
            if model.n_genes and poly.any():
                Gt = model.rotate(G, poly)
                S, Var = model.stats(Gt)
                S_all[np.ix_(pos_in_sel, cols)] = S
                V_all[np.ix_(pos_in_sel, cols)] = Var
                P_all[np.ix_(pos_in_sel, cols)] = model.pvalues(Gt, S, Var)
            bar.update(len(cols))

    out = result_table(
        adata.var_names[sel], np.repeat(np.arange(n_sel), n_var), geno.var.index, np.tile(np.arange(n_var), n_sel),
        S_all.ravel(), V_all.ravel(), info=info, pval=P_all.ravel(),
    )  # fmt: skip
    if condition is not None:
        out.attrs["condition"] = [str(c) for c in cond.columns]
    logg.info("    finished", time=start)
    return out
