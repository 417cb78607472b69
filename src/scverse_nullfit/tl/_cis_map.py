"""cis-eQTL mapping with the stored null models: :func:`scverse_nullfit.tl.cis_map`.

What is particular to cis mapping is here (gene and variant positions, windows, the rotation cache along a
chromosome, ACAT and the per-gene summary); the score statistics come from the step-2 engine (``_step2``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from threadpoolctl import threadpool_limits

from .._constants import Key
from .._core._conditional import condition, subset
from .._core._fdr import METHODS as FDR_METHODS
from .._core._fdr import qvalues
from .._core._step2 import CompactNull
from .._docs import doc_copy, doc_n_threads, doc_params, doc_spa
from .._utils import normalise_chrom, preview, select_genes
from ..io._genotypes import GenotypeMatrix, reader_class, sample_options
from ..io._vcf import VcfGenotypes
from ._groups import group_key, groups_of
from ._step2 import (
    StoredNull,
    VariantInfo,
    check_mapping_arguments,
    close_genotypes,
    open_genotypes,
    result_table,
    running,
    store_derived,
)

#: Most genes handled together in one block (their windows share one read and rotation of the variants).
MAX_BLOCK_GENES = 256
#: Most float64 elements of rotated variants kept for reuse by the next gene block (about 128 MB).
CACHE_ELEMENTS = 1 << 24
#: Most independent signals selected per gene by the forward pass of ``cis_map(independent=True)``.
MAX_SIGNALS = 64
#: Gene-level p-values ``cis_map`` can use for eGenes and independent signals -> their per-gene column.
GENE_PVALS = {"acat": "pval_acat", "bonf": "top_pval_bonf"}


def _positions(values: pd.Series, what: str) -> np.ndarray:
    if not (pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)):
        raise ValueError(f"{what} must hold numeric positions, not dtype {values.dtype}.")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def acat(pvals: np.ndarray, groups: np.ndarray | None = None, n_groups: int | None = None) -> np.ndarray | float:
    """Aggregated Cauchy association test (ACAT) of p-values, with equal weights.

    ``T = mean_i tan((1/2 - p_i) pi)`` and the combined p-value is ``P(Cauchy > T) = 1/2 - arctan(T)/pi``
    (computed as ``arctan(1/T)/pi`` for ``T > 0``, accurate for tiny p-values). Non-finite p-values are
    ignored; a p-value of 0 gives 0; a group without finite p-values gives NaN.

    Parameters
    ----------
    pvals
        P-values.
    groups
        Integer group of each p-value (0..n_groups-1): one combined p-value per group. ``None`` combines all.
    n_groups
        Number of groups (default ``groups.max() + 1``).

    Returns
    -------
    The combined p-value (a float without ``groups``, else an array over groups).
    """
    p = np.asarray(pvals, dtype=np.float64).ravel()
    single = groups is None
    groups = np.zeros(len(p), dtype=np.intp) if single else np.asarray(groups, dtype=np.intp).ravel()
    if len(groups) != len(p):
        raise ValueError(f"groups has {len(groups)} entries for {len(p)} p-values.")
    if n_groups is None:
        n_groups = int(groups.max()) + 1 if len(groups) else (1 if single else 0)
    ok = np.isfinite(p) & (p >= 0) & (p <= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # tan((1/2 - p) pi) = cot(p pi): exact for small p, where tan((1/2 - p) pi) loses digits
        t = 1.0 / np.tan(np.pi * p[ok])
    t = np.where(p[ok] == 0, np.inf, t)
    count = np.bincount(groups[ok], minlength=n_groups).astype(np.float64)
    zero = np.bincount(groups[ok], weights=(p[ok] == 0).astype(np.float64), minlength=n_groups) > 0
    total = np.bincount(groups[ok], weights=np.where(np.isinf(t), 0.0, t), minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        T = total / count
        out = np.where(T > 0, np.arctan(1.0 / T) / np.pi, 0.5 - np.arctan(T) / np.pi)
    out = np.where(zero, 0.0, out)
    out = np.where(count > 0, out, np.nan)
    return float(out[0]) if single else out


def _gene_blocks(chrom_code: np.ndarray, pos: np.ndarray, window: float) -> list[np.ndarray]:
    """Genes sorted by (chromosome, position), cut into blocks on one chromosome spanning at most ``window``."""
    order = np.lexsort((pos, chrom_code))
    blocks, i = [], 0
    while i < len(order):
        first = order[i]
        j = i + 1
        while (
            j < len(order)
            and j - i < MAX_BLOCK_GENES
            and chrom_code[order[j]] == chrom_code[first]
            and pos[order[j]] - pos[first] <= window
        ):
            j += 1
        blocks.append(order[i:j])
        i = j
    return blocks


class _RotationCache:
    """Rotated variants ``g~`` of one chromosome's position-sorted variants over a sliding range ``[lo, hi)``.

    Gene blocks come in position order, so consecutive blocks' variant ranges overlap and move forward: each
    variant is read, imputed and rotated once, as long as a block's range fits in ``CACHE_ELEMENTS``.
    """

    def __init__(self, model: CompactNull, geno: GenotypeMatrix, rows: np.ndarray, info: VariantInfo | None = None):
        self.model, self.geno, self.rows, self.info = model, geno, rows, info
        self.n = model.n_donors
        self.max_columns = max(1, CACHE_ELEMENTS // max(1, self.n))
        self._reset(None, 0)

    def _reset(self, key, at: int) -> None:
        self.key, self.lo, self.hi = key, at, at
        self.Gt = np.empty((self.n, 0))

    def _drop_before(self, at: int) -> None:
        if at > self.hi:
            self._reset(self.key, at)
        elif at > self.lo:
            self.Gt = self.Gt[:, at - self.lo :]
            self.lo = at

    def advance(self, key, lo: int) -> None:
        """Start a block whose variants begin at index ``lo`` of chromosome ``key``'s sorted variants."""
        if key != self.key or lo < self.lo:
            self._reset(key, lo)
        else:
            self._drop_before(lo)

    def get(self, cand: np.ndarray, c0: int, c1: int) -> np.ndarray:
        """``g~`` of the variants ``cand[c0:c1]`` (donors x variants)."""
        if c0 < self.lo:
            self._reset(self.key, c0)
        if c1 - self.lo > self.max_columns:
            self._drop_before(c0)
        if c1 > self.hi:
            cols = cand[self.hi : c1]
            G = self.geno.read(self.rows, cols)
            if self.info is not None:
                self.info.update(cols, G)
            Gt = self.model.rotate_dosages(G)
            self.Gt = np.concatenate([self.Gt, Gt], axis=1)
            self.hi = c1
        return self.Gt[:, c0 - self.lo : c1 - self.lo]


@doc_params(doc_n_threads=doc_n_threads, doc_copy=doc_copy, doc_spa=doc_spa)
def cis_map(
    adata: AnnData,
    genotypes: AnnData | pd.DataFrame | str | os.PathLike,
    *,
    window: int = 1_000_000,
    key: str = "nullfit",
    genes: Sequence[str] | np.ndarray | None = None,
    variants: pd.DataFrame | None = None,
    chrom_key: str = "chrom",
    pos_key: str = "start",
    variant_chrom_key: str = "chrom",
    variant_pos_key: str = "pos",
    key_added: str = "cis",
    groupby: str | None = None,
    fdr: float = 0.05,
    fdr_method: Literal["storey", "storey_bootstrap", "bh"] = "storey",
    gene_pval: Literal["acat", "bonf"] = "acat",
    independent: bool = False,
    chunk_size: int | None = None,
    spa: bool = True,
    n_threads: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Map cis-eQTLs: score-test every gene against the variants near it, and combine them per gene.

    For each gene, the variants on its chromosome within ``window`` base pairs of its position
    (``|variant pos - gene pos| <= window``, edges included) are tested with the exact score test of
    :func:`~scverse_nullfit.tl.score_test` against the gene's fitted null model. Chromosome names match with or
    without a ``chr`` prefix (``"chr1"`` = ``"1"``). Per gene, the variants' p-values are combined by the
    aggregated Cauchy association test (ACAT, equal weights: ``T = mean tan((1/2 - p) pi)``,
    ``p = 1/2 - arctan(T)/pi``), which stays valid under the linkage disequilibrium between them.

    Across genes, the false discovery rate of the gene-level p-values (ACAT, and the top variant's Bonferroni
    p-value) is controlled by Storey's q-values (``pi0`` estimated as the qvalue package does by default) or by
    Benjamini-Hochberg; genes with a q-value at most ``fdr`` are eGenes.

    With ``independent=True``, each eGene's independent signals are found by forward-backward stepwise
    selection (the logic of tensorQTL's ``map_independent``), with the conditional score test of
    :func:`~scverse_nullfit.tl.score_test` (``condition=``) on the gene's cis variants:

    - *forward*: start from the top variant; condition on the variants selected so far and scan the window
      again; while the gene-level p-value of that conditional scan (``gene_pval``: ACAT of the conditional
      p-values, or the top conditional p-value times the number of variants in the window) is at most the eGene
      threshold (the largest gene-level p-value among the eGenes at ``fdr``), add the scan's top variant (at most
      64 signals per gene);
    - *backward*: with two or more selected variants, scan again with each one left out of the conditioning
      set (conditioning on all the others); the scan's top variant is the signal of that rank if its gene-level
      p-value is at most the threshold (a variant found twice is kept once), else the rank is dropped.

    Parameters
    ----------
    adata
        The AnnData on which :func:`~scverse_nullfit.tl.fit_null` was run; ``var`` holds each gene's chromosome
        and position (e.g. its TSS).
    genotypes
        Donors x variants dosages (0..2): an AnnData whose ``var`` holds the variants' chromosome and position,
        a DataFrame indexed by donor ID (pass the positions as ``variants``), or the path of a genotype file with
        the positions in it: PLINK 1 ``.bed``, PLINK 2 ``.pgen``, BGEN ``.bgen`` (only the variants near tested
        genes are read) or a VCF/BCF, which must then be indexed (``.tbi``/``.csi``: only the genes' windows are
        read from it). Each format needs its optional package (``pip install 'scverse-nullfit[genotypes]'``);
        see :func:`~scverse_nullfit.tl.score_test`. Donors are matched by ID as in
        :func:`~scverse_nullfit.tl.score_test`; missing dosages are mean-imputed per variant. A genotype file
        with no variant on the genes' chromosomes is an error. cellink's layout
        (``chrom``, ``pos``, ``a0``, ``a1`` in ``var``; or a ``DonorData``, through its ``.G``) works as it is.
    window
        Half-width of the cis window, in base pairs.
    key
        The ``key_added`` of the ``fit_null`` call.
    genes
        Names or a boolean mask of the genes to map (default: every gene fitted under ``key``). Genes without a
        chromosome or position are skipped.
    variants
        With a DataFrame of genotypes: a DataFrame indexed by variant ID holding the chromosome and position
        columns (for the simulated data, ``adata.uns["variants"]``).
    chrom_key, pos_key
        Columns of ``adata.var`` with each gene's chromosome and position.
    variant_chrom_key, variant_pos_key
        Columns of the variants' metadata with their chromosome and position.
    key_added
        Where to store the results.
    groupby
        The ``groupby`` of a ``fit_null(groupby=...)`` call (e.g. ``"cell_type"``): map every group's fit
        (``f"{key}_{g}"``) and store its results under ``f"{key_added}_{g}"``; their tables get a column named
        ``groupby`` holding the group, and ``params`` records ``groupby`` and ``group``; q-values are per group.
        Every group's results are computed before any is stored. :func:`scverse_nullfit.get.effect_matrices`
        collects the groups' effects.
    fdr
        The false discovery rate at which genes are called eGenes (``is_egene``).
    fdr_method
        ``"storey"``: Storey's q-values with ``pi0`` from a cubic smoothing spline (3 degrees of freedom) through
        ``pi0(lambda)``, ``lambda = 0.05, 0.10, ..., 0.95`` (the qvalue package's default);
        ``"storey_bootstrap"``: the same with qvalue's bootstrap (closed-form mean squared error) choice of
        lambda; ``"bh"``: Benjamini-Hochberg.
    gene_pval
        The gene-level p-value that defines eGenes and the threshold of the independent signals: ``"acat"``
        (``pval_acat``) or ``"bonf"`` (``top_pval_bonf``).
    independent
        Also find each eGene's independent signals (see above).
    chunk_size
        Variants per chunk (default: chosen to bound memory).
    {doc_spa}
    {doc_n_threads}
    {doc_copy}

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``, with

    ``adata.uns[key_added]["variants"]``
        The per-variant table, one row per tested gene and cis variant (genes in ``adata`` order, variants by
        position): ``gene``, ``variant``, ``chrom``, ``pos``, ``distance`` (variant position minus gene
        position), the per-variant columns ``ref``, ``alt`` (the counted allele), ``af``, ``ma_samples``,
        ``ma_count``, ``n_donors``, ``n_cells``, and the score-test columns ``score``, ``score_var``, ``z``,
        ``pval``, ``beta``, ``se``, all defined in :func:`~scverse_nullfit.tl.score_test`. Get it with
        :func:`scverse_nullfit.get.cis_df`.
    ``adata.varm[key_added]``
        The per-gene summary, indexed by gene: ``n_variants`` (variants in the window), ``pval_acat`` (the ACAT
        combination of their finite p-values), ``top_variant`` (smallest p-value; first by position on ties),
        its ``top_pos``, ``top_distance``, ``top_ref``, ``top_alt``, ``top_af``, ``top_ma_samples``,
        ``top_ma_count``, ``top_z``, ``top_beta``, ``top_se``, ``top_pval``, and
        ``top_pval_bonf = min(1, top_pval * n_variants)``, ``qval`` and ``qval_bonf`` (the q-values of
        ``pval_acat`` and ``top_pval_bonf`` across the tested genes) and ``is_egene`` (the q-value of the
        ``gene_pval`` at most ``fdr``). Genes not tested have ``n_variants = 0``, NaN and ``is_egene = False``.
        Get it with :func:`scverse_nullfit.get.cis_genes_df`.
    ``adata.uns[key_added]["independent"]``
        With ``independent=True``: one row per independent signal of each eGene, ``gene``, ``rank`` (1, 2, ...),
        ``variant``, ``chrom``, ``pos``, ``distance``, the per-variant columns (``ref`` ... ``n_cells``), the
        conditional score-test columns (conditioning on the gene's other signals; a gene's single signal is its top
        variant, unconditioned), ``pval_gene`` (the gene-level p-value of that scan) and ``n_conditioned``. Get it with
        :func:`scverse_nullfit.get.cis_independent_df`.
    ``adata.uns[key_added]["params"]``
        The call's parameters, with ``pi0`` and ``pi0_bonf`` (the estimates used for ``qval`` and ``qval_bonf``),
        ``n_egenes`` and ``egene_pval_threshold`` (the largest gene-level p-value among the eGenes; NaN if none).
    ``adata.uns[key_added]["source"]``, ``adata.uns[key_added]["cells"]``
        The null-model fit the tests used (its ``key`` and ``fit_id``) and the fingerprint of its cells: the
        accessors refuse results from an earlier fit or on other cells.
    """
    if groupby is not None:
        return _map_groups(adata, genotypes, groupby, key, key_added, copy, dict(
            window=window, genes=genes, variants=variants, chrom_key=chrom_key, pos_key=pos_key,
            variant_chrom_key=variant_chrom_key, variant_pos_key=variant_pos_key, fdr=fdr, fdr_method=fdr_method,
            gene_pval=gene_pval, independent=independent, chunk_size=chunk_size, spa=spa, n_threads=n_threads,
        ))  # fmt: skip
    _check_arguments(adata, window, key, key_added, chrom_key, pos_key, chunk_size, n_threads)
    _check_fdr_arguments(fdr, fdr_method, gene_pval)
    mask = None if genes is None else select_genes(adata.var_names, genes)
    stored = StoredNull.read(adata, key)
    loci = _Loci.of_genes(adata, chrom_key, pos_key)
    mask = (stored.usable.copy() if mask is None else mask) & loci.gene_ok
    model = stored.compact(mask, spa=bool(spa))
    genes_idx = np.flatnonzero(mask)
    options = {**sample_options(genotypes, model.donors), **_window_regions(genotypes, loci, genes_idx, float(window))}
    geno = open_genotypes(genotypes, variants, **options)
    try:
        loci.add_variants(geno, variant_chrom_key, variant_pos_key, from_dataframe=isinstance(genotypes, pd.DataFrame))
        _check_chromosomes(geno, loci, genes_idx)
        rows = geno.align(model.donors)
        start = logg.info(f"cis mapping of {len(genes_idx)} genes (window={window}, key={key!r})")
        with running(n_threads, len(genes_idx), "gene", show_above=1000) as bar:
            info = VariantInfo(geno, model.counts)
            found = _test_windows(model, geno, rows, loci, genes_idx, float(window), chunk_size, bar, info)
    except BaseException:
        close_genotypes(geno, genotypes)
        raise
    gene_i, var_i, S, Var, P = _by_gene_and_position(found, loci.v_pos)
    table = _variant_table(adata, geno, gene_i, var_i, S, Var, P, genes_idx, loci, info)
    summary = _gene_summary(adata, table, gene_i)
    fdr_params = _add_fdr(summary, fdr, fdr_method, gene_pval)
    results = {Key.CIS_VARIANTS: table}
    if independent:
        egenes = np.flatnonzero(summary["is_egene"].to_numpy() & np.isin(np.arange(adata.n_vars), model.var_index))
        # each eGene's scans are small products (a gene x its window): threaded BLAS only adds synchronisation
        with running(n_threads, len(egenes), "eGene", show_above=100) as bar, threadpool_limits(1, "blas"):
            results[Key.CIS_INDEPENDENT] = _independent_signals(
                adata, model, geno, rows, loci, egenes, float(window), fdr_params["egene_pval_threshold"],
                gene_pval, bar, info,
            )  # fmt: skip
    close_genotypes(geno, genotypes)  # the independent signals read it too (on an error, garbage collection closes it)
    params = {
        "key": key,
        "window": float(window) if not float(window).is_integer() else int(window),
        "chrom_key": chrom_key,
        "pos_key": pos_key,
        "variant_chrom_key": variant_chrom_key,
        "variant_pos_key": variant_pos_key,
        "genotypes": geno.source,
        "n_genes_tested": int((summary["n_variants"] > 0).sum()),
        "n_tests": len(table),
        **fdr_params,
        "independent": bool(independent),
        "spa": bool(spa) and stored.count is not None,
    }
    target = store_derived(adata, key_added, summary, results, params, stored, copy=copy)
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    'uns[{key_added!r}][\"variants\"]', per-variant score tests (DataFrame)\n"
            f"    'varm[{key_added!r}]', per-gene summary with the ACAT p-value and q-values (DataFrame)"
            + (f"\n    'uns[{key_added!r}][\"independent\"]', independent signals (DataFrame)" if independent else "")
        ),
    )
    return target if copy else None


def _map_groups(adata: AnnData, genotypes, groupby: str, key: str, key_added: str, copy: bool, kwargs: dict):
    """``cis_map`` of every group's fit; all groups are mapped before anything is written to ``adata``."""
    groups = groups_of(adata, groupby)
    fit_keys = {g: group_key(key, g) for g in groups}
    missing = [g for g, k in fit_keys.items() if k not in adata.uns]
    if missing:
        raise KeyError(
            f"no null-model fit of groups {missing} (adata.uns[{fit_keys[missing[0]]!r}]); run "
            f"snf.tl.fit_null(adata, groupby={groupby!r}, key_added={key!r}) first."
        )
    labels = pd.Categorical(groups, categories=groups)
    results = {}
    for g, fit_key in fit_keys.items():
        out_key = group_key(key_added, g)
        shell = AnnData(obs=adata.obs, var=adata.var)
        shell.uns[fit_key] = adata.uns[fit_key]
        for name in Key.null_varm(fit_key):
            if name in adata.varm:
                shell.varm[name] = adata.varm[name]
        cis_map(shell, genotypes, key=fit_key, key_added=out_key, **kwargs)
        entry = dict(shell.uns[out_key])
        for table in entry.values():  # the per-variant table, and the independent signals when asked for
            if isinstance(table, pd.DataFrame) and "gene" in table.columns:
                codes = np.full(len(table), groups.index(g))
                table.insert(0, groupby, pd.Categorical.from_codes(codes, dtype=labels.dtype))
        entry[Key.PARAMS] = {**entry[Key.PARAMS], "groupby": groupby, "group": g, "group_of": key_added}
        summary = shell.varm[out_key]
        summary.insert(
            0, groupby, pd.Categorical.from_codes(np.full(adata.n_vars, groups.index(g)), dtype=labels.dtype)
        )
        results[out_key] = (summary, entry)
    target = adata.copy() if copy else adata
    for out_key, (summary, entry) in results.items():
        target.varm[out_key] = summary
        target.uns[out_key] = entry
    return target if copy else None


def _window_regions(genotypes, loci: _Loci, genes_idx: np.ndarray, window: float) -> dict:
    """Reader options for a VCF/BCF path: only the genes' windows are read (through its index, which it needs)."""
    if not isinstance(genotypes, (str, os.PathLike)) or reader_class(genotypes) is not VcfGenotypes:
        return {}
    chrom, pos = loci.g_chrom[genes_idx], loci.g_pos[genes_idx]
    return {"regions": [(c, max(1.0, p - window), p + window) for c, p in zip(chrom, pos, strict=True)]}


def _check_chromosomes(geno: GenotypeMatrix, loci: _Loci, genes_idx: np.ndarray) -> None:
    """A genotype source sharing no chromosome with the genes to map is an error naming both sides."""
    genes_on = set(loci.g_chrom[genes_idx])
    if not len(genes_idx) or genes_on & set(loci.v_chrom):
        return
    contigs = geno.contigs if geno.contigs is not None else list(pd.unique(loci.v_chrom[loci.v_chrom != ""]))
    raise ValueError(
        f"the genotypes ({geno.source}) have no variant on the chromosomes of the genes to map: genes on "
        f"{preview(sorted(genes_on))}, genotypes on {preview(contigs)} (names match with or without 'chr'; "
        "check the chromosome columns or rename the contigs)."
    )


def _check_arguments(adata, window, key, key_added, chrom_key, pos_key, chunk_size, n_threads) -> None:
    if not (np.isscalar(window) and np.isfinite(window) and window >= 0):
        raise ValueError(f"window must be a number of base pairs >= 0, not {window!r}.")
    check_mapping_arguments(key, key_added, chunk_size, n_threads)
    for col in (chrom_key, pos_key):
        if col not in adata.var.columns:
            raise KeyError(f"{col!r} is not a column of adata.var (columns: {list(adata.var.columns)}).")


def _check_fdr_arguments(fdr, fdr_method, gene_pval) -> None:
    if not (np.isscalar(fdr) and 0 < fdr < 1):
        raise ValueError(f"fdr must be a number strictly between 0 and 1, not {fdr!r}.")
    if fdr_method not in FDR_METHODS:
        raise ValueError(f"fdr_method must be one of {list(FDR_METHODS)}, not {fdr_method!r}.")
    if gene_pval not in GENE_PVALS:
        raise ValueError(f"gene_pval must be one of {list(GENE_PVALS)}, not {gene_pval!r}.")


def _add_fdr(summary: pd.DataFrame, fdr: float, fdr_method: str, gene_pval: str) -> dict:
    """Add ``qval``, ``qval_bonf`` and ``is_egene`` to the per-gene summary; return the FDR parameters."""
    summary["qval"], pi0 = qvalues(summary["pval_acat"].to_numpy(), fdr_method)
    summary["qval_bonf"], pi0_bonf = qvalues(summary["top_pval_bonf"].to_numpy(), fdr_method)
    q = summary["qval" if gene_pval == "acat" else "qval_bonf"].to_numpy()
    is_egene = np.isfinite(q) & (q <= fdr)
    summary["is_egene"] = is_egene
    p = summary[GENE_PVALS[gene_pval]].to_numpy()
    return {
        "fdr": float(fdr),
        "fdr_method": fdr_method,
        "gene_pval": gene_pval,
        "pi0": pi0,
        "pi0_bonf": pi0_bonf,
        "n_egenes": int(is_egene.sum()),
        "egene_pval_threshold": float(p[is_egene].max()) if is_egene.any() else float("nan"),
    }


@dataclass
class _Loci:
    """Chromosomes and positions of the genes and the variants, chromosomes coded alike for both."""

    g_chrom: np.ndarray  #: (genes,) normalised chromosome names ("" if missing)
    g_pos: np.ndarray  #: (genes,) positions (NaN if missing)
    v_chrom: np.ndarray | None = None
    v_pos: np.ndarray | None = None
    g_code: np.ndarray | None = None  #: (genes,) chromosome codes shared with ``v_code``
    v_code: np.ndarray | None = None
    by_chrom: dict | None = None  #: chromosome code -> the valid variants on it, sorted by position

    @classmethod
    def of_genes(cls, adata: AnnData, chrom_key: str, pos_key: str) -> _Loci:
        return cls(normalise_chrom(adata.var[chrom_key]), _positions(adata.var[pos_key], f"adata.var[{pos_key!r}]"))

    @property
    def gene_ok(self) -> np.ndarray:
        """Genes with a chromosome and a position."""
        return (self.g_chrom != "") & np.isfinite(self.g_pos)

    def add_variants(self, geno: GenotypeMatrix, chrom_key: str, pos_key: str, *, from_dataframe: bool) -> None:
        for col in (chrom_key, pos_key):
            if col not in geno.var.columns:
                where = "variants" if from_dataframe else "the genotypes' var"
                raise KeyError(f"{col!r} is not a column of {where} (columns: {list(geno.var.columns)}).")
        self.v_chrom = normalise_chrom(geno.var[chrom_key])
        self.v_pos = _positions(geno.var[pos_key], f"variant column {pos_key!r}")
        n_genes = len(self.g_chrom)
        codes, _ = pd.factorize(np.concatenate([self.g_chrom, self.v_chrom]))
        self.g_code, self.v_code = codes[:n_genes], codes[n_genes:]
        valid = (self.v_chrom != "") & np.isfinite(self.v_pos)
        order = np.lexsort((self.v_pos, self.v_code))
        order = order[valid[order]]
        self.by_chrom = {c: order[self.v_code[order] == c] for c in np.unique(self.v_code[order])}


def _test_windows(model: CompactNull, geno: GenotypeMatrix, rows: np.ndarray, loci: _Loci, genes_idx: np.ndarray,
                  window: float, chunk_size: int | None, bar,
                  info: VariantInfo) -> list[tuple[np.ndarray, ...]]:  # fmt: skip
    """Score statistics of every gene against the variants in its window, block by block of nearby genes.

    Returns pieces ``(gene index, variant index, S, Var, pval)`` of the (gene, variant) pairs in a window.
    """
    model_row = np.full(len(loci.g_chrom), -1, dtype=np.intp)
    model_row[model.var_index] = np.arange(model.n_genes)
    g_pos, v_pos = loci.g_pos, loci.v_pos
    pieces: list[tuple[np.ndarray, ...]] = []
    cache = _RotationCache(model, geno, rows, info)
    for block in _gene_blocks(loci.g_code[genes_idx], g_pos[genes_idx], window):
        gidx = genes_idx[block]
        bar.update(len(gidx))
        chrom = loci.g_code[gidx[0]]
        cand = loci.by_chrom.get(chrom)
        if cand is None:
            continue
        cpos = v_pos[cand]
        lo = int(np.searchsorted(cpos, g_pos[gidx].min() - window, side="left"))
        hi = int(np.searchsorted(cpos, g_pos[gidx].max() + window, side="right"))
        if hi <= lo:
            continue
        mrows = model_row[gidx]
        fitted = mrows >= 0
        cache.advance(chrom, lo)
        step = int(chunk_size) if chunk_size is not None else model.variant_chunk(max(1, int(fitted.sum())))
        for c0 in range(lo, hi, step):
            c1 = min(hi, c0 + step)
            cols = cand[c0:c1]
            inwin = np.abs(v_pos[cols][None, :] - g_pos[gidx][:, None]) <= window
            if not inwin.any():
                continue
            S = np.full((len(gidx), len(cols)), np.nan)
            Var = np.full((len(gidx), len(cols)), np.nan)
            P = np.full((len(gidx), len(cols)), np.nan)
            if fitted.any():
                Gt = cache.get(cand, c0, c1)
                S[fitted], Var[fitted] = model.stats(Gt, mrows[fitted])
                P[fitted] = model.pvalues(Gt, S[fitted], Var[fitted], mrows[fitted])
            gi, vi = np.nonzero(inwin)
            pieces.append((gidx[gi], cols[vi], S[gi, vi], Var[gi, vi], P[gi, vi]))
    return pieces


def _by_gene_and_position(pieces, v_pos: np.ndarray) -> tuple[np.ndarray, ...]:
    """The pieces concatenated and sorted by gene, then variant position (then variant index)."""
    if pieces:
        gene_i, var_i, S, Var, P = (np.concatenate(x) for x in zip(*pieces, strict=True))
    else:
        gene_i = var_i = np.zeros(0, dtype=np.intp)
        S = Var = P = np.zeros(0)
    order = np.lexsort((var_i, v_pos[var_i], gene_i))
    return gene_i[order], var_i[order], S[order], Var[order], P[order]


def _variant_table(adata, geno, gene_i, var_i, S, Var, P, genes_idx, loci: _Loci, info: VariantInfo) -> pd.DataFrame:
    used = np.unique(var_i)
    v_pos = loci.v_pos[var_i]
    return result_table(
        adata.var_names[genes_idx],
        np.searchsorted(genes_idx, gene_i),
        geno.var.index[used],
        np.searchsorted(used, var_i),
        S,
        Var,
        info=info,
        info_rows=var_i,
        pval=P,
        chrom=pd.Categorical(loci.v_chrom[var_i].astype(str)),
        pos=v_pos.astype(np.int64) if np.all(np.mod(v_pos, 1) == 0) else v_pos,
        distance=v_pos - loci.g_pos[gene_i],
    )


def _gene_summary(adata, table: pd.DataFrame, gene_i: np.ndarray) -> pd.DataFrame:
    n = adata.n_vars
    pval = table["pval"].to_numpy()
    n_var = np.bincount(gene_i, minlength=n).astype(np.int64)
    combined = acat(pval, gene_i, n)
    # top variant: smallest p-value per gene, the first by position on ties (rows are sorted by gene, position)
    finite = np.isfinite(pval)
    rank = np.lexsort((np.arange(len(pval)), np.where(finite, pval, np.inf), gene_i))
    first = np.ones(len(rank), dtype=bool)
    first[1:] = gene_i[rank][1:] != gene_i[rank][:-1]
    top = rank[first & finite[rank]]
    tg = gene_i[top]

    def col(values, fill=np.nan):
        out = np.full(n, fill, dtype=np.float64)
        out[tg] = values[top]
        return out

    top_pval = col(pval)

    def categorical(name):
        c = table[name].cat
        codes = np.full(n, -1, dtype=np.int64)
        codes[tg] = c.codes.to_numpy()[top]
        return pd.Categorical.from_codes(codes, categories=c.categories)

    return pd.DataFrame(
        {
            "n_variants": n_var,
            "pval_acat": combined,
            "top_variant": categorical("variant"),
            "top_pos": col(table["pos"].to_numpy(dtype=np.float64)),
            "top_distance": col(table["distance"].to_numpy(dtype=np.float64)),
            "top_ref": categorical("ref"),
            "top_alt": categorical("alt"),
            "top_af": col(table["af"].to_numpy()),
            "top_ma_samples": col(table["ma_samples"].to_numpy(dtype=np.float64)),
            "top_ma_count": col(table["ma_count"].to_numpy(dtype=np.float64)),
            "top_z": col(table["z"].to_numpy()),
            "top_beta": col(table["beta"].to_numpy()),
            "top_se": col(table["se"].to_numpy()),
            "top_pval": top_pval,
            "top_pval_bonf": np.minimum(1.0, top_pval * n_var),
        },
        index=adata.var_names.copy(),
    )


def _independent_signals(adata, model: CompactNull, geno: GenotypeMatrix, rows: np.ndarray, loci: _Loci,
                         egenes: np.ndarray, window: float, threshold: float, gene_pval: str,
                         bar, info: VariantInfo | None = None) -> pd.DataFrame:  # fmt: skip
    """Forward-backward selection of each eGene's independent signals (see :func:`cis_map`), gene by gene along
    each chromosome, every scan vectorised over the window's variants (rotated once, through the cache)."""
    model_row = np.full(adata.n_vars, -1, dtype=np.intp)
    model_row[model.var_index] = np.arange(model.n_genes)
    cache = _RotationCache(model, geno, rows)
    found: list[tuple] = []
    for g in egenes[np.lexsort((loci.g_pos[egenes], loci.g_code[egenes]))]:
        bar.update(1)
        chrom, gpos = loci.g_code[g], loci.g_pos[g]
        cand = loci.by_chrom.get(chrom)
        if cand is None:
            continue
        cpos = loci.v_pos[cand]
        lo = int(np.searchsorted(cpos, gpos - window, side="left"))
        hi = int(np.searchsorted(cpos, gpos + window, side="right"))
        if hi <= lo:
            continue
        cache.advance(chrom, lo)
        Gt = np.ascontiguousarray(cache.get(cand, lo, hi))
        for rank, j, stats, pg, k in _select(subset(model, [model_row[g]]), Gt, threshold, gene_pval):
            found.append((g, rank, cand[lo + j], pg, k, *stats))
    cols = list(zip(*found, strict=True)) if found else [np.zeros(0)] * 8
    gene_i = np.asarray(cols[0], dtype=np.intp)
    var_i = np.asarray(cols[2], dtype=np.intp)
    used = np.unique(var_i)
    v_pos = loci.v_pos[var_i]
    order_genes = np.unique(gene_i)
    table = result_table(
        adata.var_names[order_genes],
        np.searchsorted(order_genes, gene_i),
        geno.var.index[used],
        np.searchsorted(used, var_i),
        np.asarray(cols[5], dtype=np.float64),
        np.asarray(cols[6], dtype=np.float64),
        info=info,
        info_rows=var_i,
        pval=np.asarray(cols[7], dtype=np.float64),
        rank=np.asarray(cols[1], dtype=np.int64),
        chrom=pd.Categorical(loci.v_chrom[var_i].astype(str)),
        pos=v_pos.astype(np.int64) if np.all(np.mod(v_pos, 1) == 0) else v_pos,
        distance=v_pos - loci.g_pos[gene_i],
    )
    table["pval_gene"] = np.asarray(cols[3], dtype=np.float64)
    table["n_conditioned"] = np.asarray(cols[4], dtype=np.int64)
    table = table[["gene", "rank", "variant", *table.columns[3:]]]
    order = np.lexsort((table["rank"].to_numpy(), gene_i))
    return table.iloc[order].reset_index(drop=True)


def _select(model: CompactNull, Gt: np.ndarray, threshold: float, gene_pval: str):
    """The independent signals of the one gene of ``model`` among the rotated window variants ``Gt``: tuples of
    (rank, column of ``Gt``, (score, variance), gene-level p-value of the scan, number of conditioning variants)."""
    n_window = Gt.shape[1]
    Gt2 = Gt * Gt  # shared by every scan of the gene

    def scan(selected: list[int]):
        m = model
        if selected:
            m, ok = condition(model, Gt[:, selected])
            if not ok[0]:
                return None
        S, Var = m.stats(Gt, Gt2=Gt2)
        pval = m.pvalues(Gt, S, Var)[0]
        finite = np.isfinite(pval)
        if not finite.any():
            return None
        top = int(np.argmin(np.where(finite, pval, np.inf)))
        if gene_pval == "acat":
            pg = acat(pval)
        else:
            pg = min(1.0, float(pval[top]) * n_window)
        return top, (float(S[0, top]), float(Var[0, top]), float(pval[top])), pg

    first = scan([])
    if first is None:
        return []
    selected = [first[0]]
    while len(selected) < MAX_SIGNALS:
        res = scan(selected)
        if res is None or not res[2] <= threshold or res[0] in selected:
            break
        selected.append(res[0])
    if len(selected) == 1:
        return [(1, first[0], first[1], first[2], 0)]
    out, seen = [], set()
    for rank, j in enumerate(selected, 1):
        others = [i for i in selected if i != j]
        res = scan(others)
        if res is not None and res[2] <= threshold and res[0] not in seen:
            seen.add(res[0])
            out.append((rank, res[0], res[1], res[2], len(others)))
    return out
