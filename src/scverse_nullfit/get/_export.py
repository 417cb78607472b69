"""Results in the shapes other tools read: tensorQTL tables, coloc datasets, in-sample LD for SuSiE, and effect
matrices of several cell types for sharing analyses (mashr)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import Key
from ._assoc import cis_df, cis_genes_df

if TYPE_CHECKING:
    from anndata import AnnData

#: tensorQTL's columns of one variant-gene pair after the variant's ID, in its order: column -> dtype.
_PAIR = {
    "start_distance": np.int32,
    "ma_samples": np.int32,
    "ma_count": np.int32,
    "af": np.float32,
    "pval_nominal": np.float64,
    "slope": np.float32,
    "slope_se": np.float32,
}
#: tensorQTL's nominal cis pairs (``cis_qtl_pairs.{chrom}.parquet``): column -> dtype.
TENSORQTL_NOMINAL = {
    "phenotype_id": object,
    "variant_id": object,
    "start_distance": np.int32,
    "af": np.float32,
    "ma_samples": np.int32,
    "ma_count": np.int32,
    "pval_nominal": np.float64,
    "slope": np.float32,
    "slope_se": np.float32,
}
#: tensorQTL's per-gene table (``cis_qtl.txt.gz``), the columns we have: column -> dtype.
TENSORQTL_GENE = {"phenotype_id": object, "num_var": np.int32, "variant_id": object, **_PAIR}
#: tensorQTL's independent signals (``cis_independent_qtl.txt.gz``), the columns we have: column -> dtype.
TENSORQTL_INDEPENDENT = {"phenotype_id": object, "variant_id": object, **_PAIR, "rank": np.int32}
#: tensorQTL's trans pairs (``trans_qtl_pairs.parquet``): column -> dtype.
TENSORQTL_TRANS = {
    "variant_id": object,
    "phenotype_id": object,
    "pval": np.float64,
    "b": np.float32,
    "b_se": np.float32,
    "af": np.float32,
}
#: Columns of our per-gene summary carried into the tensorQTL gene table when present (gene-level p-values, FDR).
GENE_EXTRA = ("pval_acat", "top_pval_bonf", "qval", "qval_bonf", "is_egene")


def _strings(values) -> np.ndarray:
    return np.asarray(pd.Series(values).astype(str), dtype=object)


def _pair_columns(table, prefix: str = "") -> dict:
    """tensorQTL's per-pair columns from ours: per-variant columns, or a gene summary's ``top_`` ones."""
    return {
        "variant_id": _strings(table[f"{prefix}variant"]),
        "start_distance": np.rint(table[f"{prefix}distance"].to_numpy(dtype=np.float64)),
        "ma_samples": table[f"{prefix}ma_samples"],
        "ma_count": table[f"{prefix}ma_count"],
        "af": table[f"{prefix}af"],
        "pval_nominal": table[f"{prefix}pval"],
        "slope": table[f"{prefix}beta"],
        "slope_se": table[f"{prefix}se"],
    }


def _typed(columns: dict, dtypes: dict) -> pd.DataFrame:
    return pd.DataFrame({name: np.asarray(columns[name]).astype(dtypes[name]) for name in dtypes})


def tensorqtl_df(
    data: AnnData | pd.DataFrame,
    key: str = "cis",
    kind: Literal["nominal", "gene", "independent", "trans"] = "nominal",
    *,
    by_chrom: bool = False,
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """Results with tensorQTL's column names and dtypes, for scripts written for tensorQTL output.

    The statistics are ours (the exact score test of the null mixed model, see
    :func:`~scverse_nullfit.tl.score_test`): ``slope``/``b`` is the effect of one more copy of the counted (``alt``)
    allele, ``slope_se``/``b_se`` its standard error, ``pval_nominal``/``pval`` the score-test p-value; ``af``,
    ``ma_samples`` and ``ma_count`` are over the fit's donors (see :func:`~scverse_nullfit.tl.score_test`).
    ``start_distance`` is the variant position minus the gene position of ``cis_map``'s ``pos_key`` (tensorQTL's
    distance to the phenotype start).

    Parameters
    ----------
    data
        An AnnData with results of :func:`~scverse_nullfit.tl.cis_map` under ``key`` (or, for ``kind="trans"``, of
        a trans scan, or a results DataFrame kept in ``adata.uns[key]``), or a results DataFrame such as the output of
        :func:`~scverse_nullfit.tl.score_test` (``kind="trans"``).
    key
        The ``key_added`` of the ``cis_map`` call, or the ``uns`` key of stored trans results.
    kind
        ``"nominal"``: every tested cis pair (tensorQTL's ``map_nominal``: ``phenotype_id, variant_id,
        start_distance, af, ma_samples, ma_count, pval_nominal, slope, slope_se``). ``"gene"``: one row per tested
        gene with its top variant (``phenotype_id, num_var, variant_id, start_distance, ma_samples, ma_count, af,
        pval_nominal, slope, slope_se`` as tensorQTL's ``map_cis``), followed by our gene-level p-values
        ``pval_acat`` (ACAT over the gene's variants, the analogue of tensorQTL's ``pval_beta``) and
        ``top_pval_bonf``, and ``qval``, ``qval_bonf``, ``is_egene`` when the results hold them; genes whose
        variants all gave NaN are left out. ``"independent"``: the signals of ``cis_map(independent=True)`` as
        tensorQTL's ``map_independent`` reports them (the top-variant columns above with the conditional
        statistics, and ``rank``), followed by ``pval_gene`` (the gene-level p-value of the signal's conditional
        scan). ``"trans"``: pairs as tensorQTL's ``map_trans`` (``variant_id, phenotype_id, pval, b, b_se,
        af``).
    by_chrom
        With ``kind="nominal"``: a dict chromosome -> table (the gene's chromosome as in ``adata.var``), as tensorQTL
        writes one file per chromosome; see :func:`scverse_nullfit.io.write_tensorqtl`.

    Returns
    -------
    A DataFrame with a fresh integer index (a dict of them with ``by_chrom=True``); identifiers as Python strings.
    """
    from anndata import AnnData

    if kind == "trans":
        return _trans(data, key)
    if kind not in ("nominal", "gene", "independent"):
        raise ValueError(f"kind must be 'nominal', 'gene', 'independent' or 'trans', not {kind!r}.")
    if not isinstance(data, AnnData):
        raise ValueError(f"kind={kind!r} reads cis_map results from an AnnData, not a {type(data).__name__}.")
    if kind == "gene":
        return _gene(data, key)
    if kind == "independent":
        return _independent(data, key)
    table = cis_df(data, key)
    out = _typed({"phenotype_id": _strings(table["gene"]), **_pair_columns(table)}, TENSORQTL_NOMINAL)
    if not by_chrom:
        return out
    chrom_key = data.uns[key].get(Key.PARAMS, {}).get("chrom_key", "chrom")
    if chrom_key in data.var.columns:
        gene_chrom = data.var[chrom_key].astype(str)
        chrom = gene_chrom.reindex(out["phenotype_id"]).to_numpy()
    else:
        chrom = table["chrom"].astype(str).to_numpy()
    codes, names = pd.factorize(chrom)
    return {str(c): out[codes == i].reset_index(drop=True) for i, c in enumerate(names)}


def _gene(adata: AnnData, key: str) -> pd.DataFrame:
    summary = cis_genes_df(adata, key, tested_only=True)
    summary = summary[summary["top_variant"].notna().to_numpy() & np.isfinite(summary["top_pval"].to_numpy())]
    columns = {"phenotype_id": _strings(summary.index), "num_var": summary["n_variants"]}
    out = _typed({**columns, **_pair_columns(summary, "top_")}, TENSORQTL_GENE)
    for name in GENE_EXTRA:
        if name in summary.columns:
            out[name] = summary[name].to_numpy()
    return out


def _independent(adata: AnnData, key: str) -> pd.DataFrame:
    from ._assoc import cis_independent_df

    table = cis_independent_df(adata, key)
    columns = {"phenotype_id": _strings(table["gene"]), **_pair_columns(table), "rank": table["rank"]}
    out = _typed(columns, TENSORQTL_INDEPENDENT)
    out["pval_gene"] = table["pval_gene"].to_numpy()
    return out


def _trans(data, key: str) -> pd.DataFrame:
    from anndata import AnnData

    table = data
    if isinstance(data, AnnData):
        stored = data.uns.get(key)
        if isinstance(stored, Mapping):
            frames = [v for v in stored.values() if isinstance(v, pd.DataFrame) and {"gene", "variant"} <= set(v)]
            stored = stored.get(Key.TRANS_PAIRS, frames[0] if len(frames) == 1 else None)
        if not isinstance(stored, pd.DataFrame):
            raise KeyError(
                f"no trans results under adata.uns[{key!r}]: keep a results table there (e.g. "
                f"adata.uns[{key!r}] = snf.tl.score_test(adata, genotypes)) or pass the DataFrame."
            )
        table = stored
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"kind='trans' needs an AnnData or a results DataFrame, not {type(table).__name__}.")
    missing = [c for c in ("gene", "variant", "pval", "beta", "se") if c not in table.columns]
    if missing:
        raise KeyError(f"the results table has no column(s) {missing} (columns: {list(table.columns)}).")
    af = table["af"] if "af" in table.columns else np.full(len(table), np.nan)
    return _typed(
        {
            "variant_id": _strings(table["variant"]),
            "phenotype_id": _strings(table["gene"]),
            "pval": table["pval"],
            "b": table["beta"],
            "b_se": table["se"],
            "af": af,
        },
        TENSORQTL_TRANS,
    )


def _fit_key(adata: AnnData, key: str) -> str:
    """The null-fit key behind ``key`` (a cis result records it; a fit is its own)."""
    stored = adata.uns.get(key)
    if isinstance(stored, Mapping) and "donors" in stored:
        return key
    if isinstance(stored, Mapping) and Key.PARAMS in stored and "key" in stored[Key.PARAMS]:
        return str(stored[Key.PARAMS]["key"])
    raise KeyError(f"adata.uns[{key!r}] is neither a null-model fit nor cis_map results that name one.")


def _fit_donors(adata: AnnData, fit_key: str) -> pd.Index:
    fit = adata.uns.get(fit_key)
    if not isinstance(fit, Mapping) or "donors" not in fit:
        raise KeyError(f"no null-model fit under adata.uns[{fit_key!r}]; run snf.tl.fit_null first.")
    return pd.Index(np.asarray(fit["donors"], dtype=object).astype(str))


def coloc_dataset(
    adata: AnnData,
    gene: str,
    key: str = "cis",
    *,
    genotypes=None,
) -> dict:
    """One gene's cis results as a coloc dataset (``coloc.abf``, ``coloc.susie``; passes ``check_dataset``).

    Variants with a finite effect and standard error and a minor allele frequency strictly between 0 and 1 are
    kept, in position order. Through rpy2, convert the arrays to R vectors and the dict to a named list.

    Parameters
    ----------
    adata
        An AnnData with results of :func:`~scverse_nullfit.tl.cis_map` under ``key`` and the null-model fit they
        came from.
    gene
        The gene.
    key
        The ``key_added`` of the ``cis_map`` call.
    genotypes
        The genotypes given to ``cis_map`` (any form it takes): adds ``LD``, the in-sample correlation matrix of
        :func:`ld` with the variants as row and column names, for ``coloc.susie``/``runsusie``.

    Returns
    -------
    A dict with ``beta`` (effect of one more ``alt`` allele, expression units), ``varbeta`` (``se**2``), ``snp``
    (variant IDs), ``position``, ``MAF`` (``min(af, 1 - af)`` over the fit's donors), ``N`` (the number of donors of
    the fit: the independent units), ``type = "quant"`` and ``sdY = sqrt(sigma2_g + sigma2_e)`` of the gene's null
    model, the standard deviation of a cell's expression given the covariates (on the expression scale the fit
    used, so on the scale of ``beta``; the genetic part at a GRM diagonal of 1). All vectors have equal length and
    no NaN.
    """
    if gene not in adata.var_names:
        raise KeyError(f"gene {gene!r} is not in adata.var_names.")
    fit_key = _fit_key(adata, key)
    table = cis_df(adata, key, genes=gene)
    af = table["af"].to_numpy(dtype=np.float64)
    maf = np.minimum(af, 1.0 - af)
    beta, se = table["beta"].to_numpy(dtype=np.float64), table["se"].to_numpy(dtype=np.float64)
    keep = np.isfinite(beta) & np.isfinite(se) & (se > 0) & (maf > 0) & (maf < 1)
    if not keep.any():
        raise ValueError(f"gene {gene!r} has no tested variant with a finite effect under cis results {key!r}.")
    table = table[keep]
    if fit_key not in adata.varm:
        raise KeyError(f"no null-model results under adata.varm[{fit_key!r}] (the fit behind {key!r}).")
    fit = adata.varm[fit_key]
    row = adata.var_names.get_loc(gene)
    s2 = float(fit["sigma2_g"].iloc[row]) + float(fit["sigma2_e"].iloc[row])
    out = {
        "beta": beta[keep],
        "varbeta": se[keep] ** 2,
        "snp": _strings(table["variant"]),
        "position": table["pos"].to_numpy(),
        "MAF": maf[keep],
        "N": len(_fit_donors(adata, fit_key)),
        "type": "quant",
        "sdY": float(np.sqrt(s2)),
    }
    if genotypes is not None:
        R, _ = ld(adata, genotypes, list(out["snp"]), key=key)
        out["LD"] = R
    return out


def ld(
    adata: AnnData,
    genotypes,
    variants: Sequence[str] | None = None,
    *,
    gene: str | None = None,
    key: str = "cis",
) -> tuple[pd.DataFrame, pd.Series | None]:
    """In-sample LD of variants among the fit's donors, with a gene's z-scores, for ``susie_rss`` / ``coloc.susie``.

    The LD matrix is the Pearson correlation of the dosages (of the counted ``alt`` allele, missing dosages
    mean-imputed per variant) over the donors of the null-model fit, each donor once: symmetric, unit diagonal,
    rows and columns in the order of ``variants``. The z-scores are those of the score test, oriented on the same
    allele. The score test weighs donors by their cells and relatedness, so the z-scores' own correlation is
    close to, not exactly, this donor correlation; ``susie_rss`` expects the same in-sample LD.

    Parameters
    ----------
    adata
        An AnnData with a null-model fit (and, for ``gene``, results of :func:`~scverse_nullfit.tl.cis_map`).
    genotypes
        Dosages in any form the step-2 tools take (DataFrame, AnnData, file path, reader, cellink ``DonorData``).
    variants
        Variant IDs, in the order wanted. Default (with ``gene``): the gene's tested variants with a finite z-score,
        by position.
    gene
        A gene whose z-scores to return (from the ``cis_map`` results under ``key``).
    key
        The ``key_added`` of ``cis_map`` (or of ``fit_null``, for the LD alone).

    Returns
    -------
    ``(R, z)``: ``R`` a variants x variants DataFrame, ``z`` a Series of the gene's z-scores indexed like ``R``
    (NaN for a variant the gene was not tested with), or None without ``gene``.
    """
    from ..io._genotypes import GenotypeMatrix, sample_options

    fit_key = _fit_key(adata, key)
    donors = _fit_donors(adata, fit_key)
    z_by_variant = None
    if gene is not None:
        if gene not in adata.var_names:
            raise KeyError(f"gene {gene!r} is not in adata.var_names.")
        table = cis_df(adata, key, genes=gene)
        finite = np.isfinite(table["z"].to_numpy(dtype=np.float64))
        z_by_variant = pd.Series(table["z"].to_numpy(dtype=np.float64), index=_strings(table["variant"]))
        if variants is None:
            variants = list(z_by_variant.index[finite])
    if variants is None:
        raise ValueError("give variants, or a gene whose tested variants to use.")
    names = pd.Index(_strings(np.atleast_1d(np.asarray(variants, dtype=object))), name="variant")
    if names.has_duplicates:
        raise ValueError(f"variants are duplicated: {list(names[names.duplicated()].unique()[:5])}.")
    geno = GenotypeMatrix(genotypes, reader_options=sample_options(genotypes, donors))  # only the fit's donors
    try:  # a reader opened here from a path is closed here
        rows = geno.align(donors)
        cols = geno.var.index.get_indexer(names)
        if (cols < 0).any():
            raise KeyError(f"variants not in the genotypes: {list(names[cols < 0][:5])}.")
        G = geno.read(rows, cols)
    finally:
        geno.close()
    observed = ~np.isnan(G)
    if not observed.any(axis=0).all():
        raise ValueError(
            f"variants without any observed dosage among the fit's donors: {list(names[~observed.any(0)][:5])}."
        )
    mean = np.where(observed, G, 0.0).sum(axis=0) / observed.sum(axis=0)
    Gc = np.where(observed, G, mean) - mean
    norm = np.sqrt((Gc * Gc).sum(axis=0))
    mono = norm <= 1e-12 * np.maximum(1.0, np.abs(mean)) * np.sqrt(len(rows))
    if mono.any():
        raise ValueError(
            f"variants monomorphic among the fit's donors have no correlation: {list(names[mono][:5])}; leave them out."
        )
    Gs = Gc / norm
    R = Gs.T @ Gs
    R = (R + R.T) / 2.0
    np.fill_diagonal(R, 1.0)
    R = np.clip(R, -1.0, 1.0)
    z = None if z_by_variant is None else z_by_variant.reindex(names).rename("z")
    return pd.DataFrame(R, index=names, columns=names.copy()), z


def effect_matrices(
    adata: AnnData,
    keys: Sequence[str] | Mapping[str, str] | None = None,
    *,
    key: str = "cis",
    pairs: Literal["all", "top"] = "all",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Effect sizes and standard errors of gene-variant pairs across several cis maps (e.g. one per cell type), as
    the ``Bhat`` and ``Shat`` matrices of a sharing analysis (mashr's ``mash_set_data(Bhat, Shat)``).

    Parameters
    ----------
    adata
        An AnnData with several :func:`~scverse_nullfit.tl.cis_map` results.
    keys
        Their keys (the columns are then the groups they record, e.g. the cell types of ``cis_map(groupby=...)``,
        else the keys), or a mapping column label -> key. Default: every result of ``cis_map(groupby=...,
        key_added=key)``.
    key
        With ``keys=None``: the ``key_added`` of the grouped ``cis_map`` call.
    pairs
        ``"all"``: the pairs tested in every result. ``"top"``: per gene, the one pair with the smallest p-value in
        any result (mashr's "strong" set).

    Returns
    -------
    ``(Bhat, Shat)``: DataFrames with a (``gene``, ``variant``) MultiIndex and one column per result; pairs
    without a finite effect in every result are left out.
    """
    labels = _result_keys(adata, keys, key)
    frames = {}
    for label, k in labels.items():
        t = cis_df(adata, k)
        idx = pd.MultiIndex.from_arrays([_strings(t["gene"]), _strings(t["variant"])], names=["gene", "variant"])
        frames[label] = pd.DataFrame(
            {"beta": t["beta"].to_numpy(), "se": t["se"].to_numpy(), "pval": t["pval"].to_numpy()}, index=idx
        )
    common = None
    for f in frames.values():
        common = f.index if common is None else common.intersection(f.index, sort=False)
    B = pd.DataFrame({label: f["beta"].reindex(common) for label, f in frames.items()})
    S = pd.DataFrame({label: f["se"].reindex(common) for label, f in frames.items()})
    ok = np.isfinite(B.to_numpy()).all(axis=1) & np.isfinite(S.to_numpy()).all(axis=1)
    B, S = B[ok], S[ok]
    if pairs == "top":
        P = pd.DataFrame({label: f["pval"].reindex(B.index) for label, f in frames.items()})
        best = P.min(axis=1).to_numpy()
        order = pd.DataFrame({"gene": B.index.get_level_values(0), "p": best}).reset_index()
        pick = order.sort_values(["gene", "p", "index"]).drop_duplicates("gene")["index"].to_numpy()
        pick.sort()
        B, S = B.iloc[pick], S.iloc[pick]
    elif pairs != "all":
        raise ValueError(f"pairs must be 'all' or 'top', not {pairs!r}.")
    return B, S


def _result_keys(adata: AnnData, keys, key: str) -> dict[str, str]:
    """Column label -> cis result key: a mapping as given; keys labelled by the group they record (or by themselves
    when groups repeat or are missing); or, without keys, every result of ``cis_map(groupby=..., key_added=key)``."""
    if isinstance(keys, Mapping):
        return {str(label): str(k) for label, k in keys.items()}

    def params(stored) -> dict:
        return stored.get(Key.PARAMS, {}) if isinstance(stored, Mapping) else {}

    if keys is None:
        found = {
            str(params(v)["group"]): str(k)
            for k, v in adata.uns.items()
            if isinstance(v, Mapping) and Key.CIS_VARIANTS in v
            and params(v).get("group_of") == key and "group" in params(v)
        }  # fmt: skip
        if not found:
            raise KeyError(f"no results of cis_map(groupby=..., key_added={key!r}) in adata.uns; pass keys.")
        return found
    keys = [keys] if isinstance(keys, str) else [str(k) for k in keys]
    labels = [str(params(adata.uns.get(k)).get("group", k)) for k in keys]
    if len(set(labels)) < len(labels):
        labels = keys
    return dict(zip(labels, keys, strict=True))
