"""Genome-wide and genotype-level plots: Manhattan plot, expression by genotype class, gene bodies of a locus."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._docs import doc_ax_show, doc_params, doc_plot_returns
from .._utils import normalise_chrom
from ._utils import finish, new_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

_TINY = np.finfo(np.float64).tiny


def _chrom_order(names) -> list[str]:
    """Chromosome names in natural order: numbers, then X, Y, M/MT, then the rest alphabetically."""

    def rank(name: str):
        bare = re.sub(r"^chr", "", str(name), flags=re.IGNORECASE)
        if bare.isdigit():
            return (0, int(bare), "")
        special = {"X": 1, "Y": 2, "M": 3, "MT": 3}
        return (1, special.get(bare.upper(), 9), bare)

    return sorted({str(n) for n in names}, key=rank)


def _manhattan_points(data, key: str, level: str, column: str | None, variants, chrom_key, pos_key):
    """``(chrom, pos, p)`` arrays of the points of a Manhattan plot."""
    from anndata import AnnData

    from ..get import cis_df, cis_genes_df

    if isinstance(data, AnnData):
        if level == "gene":
            params = data.uns.get(key, {}).get("params", {}) if isinstance(data.uns.get(key), Mapping) else {}
            ck, pk = chrom_key or params.get("chrom_key", "chrom"), pos_key or params.get("pos_key", "start")
            summary = cis_genes_df(data, key, tested_only=True)
            for col in (ck, pk):
                if col not in data.var.columns:
                    raise KeyError(f"{col!r} is not a column of adata.var (columns: {list(data.var.columns)}).")
            var = data.var.loc[summary.index]
            return (
                var[ck].astype(str).to_numpy(),
                var[pk].to_numpy(dtype=np.float64),
                summary[column or "pval_acat"].to_numpy(dtype=np.float64),
            )
        if level != "variant":
            raise ValueError(f"level must be 'gene' or 'variant', not {level!r}.")
        data = cis_df(data, key)
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be an AnnData or a results DataFrame, not {type(data).__name__}.")
    column = column or "pval"
    ck, pk = chrom_key or "chrom", pos_key or "pos"
    if column not in data.columns:
        raise KeyError(f"column {column!r} not in the DataFrame (columns: {list(data.columns)}).")
    if ck in data.columns and pk in data.columns:
        chrom, pos = data[ck].astype(str).to_numpy(), data[pk].to_numpy(dtype=np.float64)
    else:
        if variants is None or "variant" not in data.columns:
            raise KeyError(
                f"the table has no {ck!r}/{pk!r} columns: pass variants, a DataFrame indexed by variant ID with them."
            )
        where = variants.reindex(data["variant"].astype(str))
        if where[pk].isna().any():
            missing = data["variant"].astype(str)[where[pk].isna().to_numpy()].unique()[:5]
            raise KeyError(f"variants has no position for {list(missing)}.")
        chrom, pos = where[ck].astype(str).to_numpy(), where[pk].to_numpy(dtype=np.float64)
    return chrom, pos, data[column].to_numpy(dtype=np.float64)


@doc_params(doc_ax_show=doc_ax_show, doc_plot_returns=doc_plot_returns)
def manhattan(
    data: AnnData | pd.DataFrame,
    *,
    key: str = "cis",
    level: Literal["gene", "variant"] = "gene",
    column: str | None = None,
    variants: pd.DataFrame | None = None,
    chrom_key: str | None = None,
    pos_key: str | None = None,
    threshold: float | None = None,
    colors: tuple[str, str] = ("tab:blue", "tab:gray"),
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs,
) -> Axes | None:
    """Manhattan plot: -log10 p-values along the genome, chromosomes in natural order with alternating colours.

    Parameters
    ----------
    data
        An AnnData with results of :func:`~scverse_nullfit.tl.cis_map` under ``key``, or a results DataFrame
        (e.g. of :func:`~scverse_nullfit.tl.score_test` or a trans scan) with chromosome and position columns or
        a ``variant`` column and ``variants``.
    key
        With an AnnData: the ``key_added`` of ``cis_map``.
    level
        With an AnnData: ``"gene"`` (one point per tested gene at its position, its gene-level p-value
        ``pval_acat``) or ``"variant"`` (every tested pair at the variant's position).
    column
        The p-value column (default ``pval_acat`` per gene, ``pval`` per pair; e.g. ``top_pval_bonf`` or ``qval``).
    variants
        For a DataFrame without positions: variant ID -> ``chrom`` and ``pos`` (e.g. ``adata.uns["variants"]``).
    chrom_key, pos_key
        Chromosome and position columns (defaults: those ``cis_map`` used for genes, ``chrom``/``pos`` otherwise).
    threshold
        Draw a horizontal line at this p-value (e.g. a Bonferroni threshold).
    colors
        The two alternating chromosome colours.
    {doc_ax_show}
    save
        Save the figure to ``settings.figdir`` as ``manhattan``, as in :func:`qq`.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    {doc_plot_returns}
    """
    chrom, pos, p = _manhattan_points(data, key, level, column, variants, chrom_key, pos_key)
    keep = np.isfinite(p) & np.isfinite(pos) & (p >= 0) & (p <= 1)
    chrom, pos, p = chrom[keep], pos[keep], p[keep]
    ax = new_axes(ax, figsize=(8.0, 3.5))
    mlp = -np.log10(np.maximum(p, _TINY))
    offset, ticks, labels = 0.0, [], []
    kwargs.setdefault("s", 8)
    for i, c in enumerate(_chrom_order(chrom)):
        on = chrom == c
        x = pos[on] - pos[on].min() + offset
        ax.scatter(x, mlp[on], color=colors[i % 2], **kwargs)
        ticks.append((x.min() + x.max()) / 2)
        labels.append(re.sub(r"^chr", "", c, flags=re.IGNORECASE))
        offset = x.max() + max(1.0, 0.02 * (np.ptp(pos) if len(pos) else 1.0))
    if threshold is not None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a p-value in (0, 1], not {threshold!r}.")
        ax.axhline(-np.log10(threshold), color="tab:red", ls="--", lw=1)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize="small")
    ax.set_xlabel("chromosome")
    ax.set_ylabel("-log10(p)")
    ax.set_ylim(bottom=0)
    return finish(ax, "manhattan", show, save)


@doc_params(doc_ax_show=doc_ax_show, doc_plot_returns=doc_plot_returns)
def expression_by_genotype(
    adata: AnnData,
    gene: str,
    variant: str,
    genotypes,
    *,
    groupby: str | None = None,
    key: str = "nullfit",
    donor_key: str | None = None,
    layer: str | None = None,
    per: Literal["donor", "cell"] = "donor",
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """A gene's expression by genotype class of a variant (0, 1, 2 copies of ``alt``), optionally by cell type.

    Boxes of the expression with the points over them. By default each point is a donor's mean expression (the
    donors are the independent units the score test weighs); ``per="cell"`` shows every cell.

    Parameters
    ----------
    adata
        Cells x genes, with the expression the fit used (``X`` or ``layer``).
    gene
        The gene.
    variant
        The variant ID.
    genotypes
        The donors' dosages, in any form the step-2 tools take; dosages are rounded to the nearest class, missing
        ones left out. Allele names (``ref``/``alt``) label the classes when the source has them.
    groupby
        A column of ``obs`` (e.g. ``"cell_type"``): boxes per group side by side within each genotype class.
    key
        A null-model fit whose ``donor_key`` to use (default ``"donor_id"`` when there is none).
    donor_key
        The column of ``obs`` with donor IDs (overrides the fit's).
    layer
        Layer to use instead of ``X``.
    per
        ``"donor"`` (donor means, per group with ``groupby``) or ``"cell"``.
    {doc_ax_show}
    save
        Save the figure to ``settings.figdir`` as ``expression_by_genotype_<gene>``, as in :func:`qq`.

    {doc_plot_returns}
    """
    from scipy import sparse

    from ..io._genotypes import GenotypeMatrix, allele_columns, sample_options

    if gene not in adata.var_names:
        raise KeyError(f"gene {gene!r} is not in adata.var_names.")
    if per not in ("donor", "cell"):
        raise ValueError(f"per must be 'donor' or 'cell', not {per!r}.")
    if donor_key is None:
        fit = adata.uns.get(key)
        donor_key = fit.get("params", {}).get("donor_key", "donor_id") if isinstance(fit, Mapping) else "donor_id"
    for col in (donor_key, groupby):
        if col is not None and col not in adata.obs.columns:
            raise KeyError(f"{col!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    donors = pd.unique(adata.obs[donor_key].astype(str).to_numpy())  # only these are read from a file
    geno = GenotypeMatrix(genotypes, reader_options=sample_options(genotypes, donors))
    try:  # a reader opened here from a path is closed here
        col = geno.var.index.get_indexer([str(variant)])
        if col[0] < 0:
            raise KeyError(f"variant {variant!r} is not in the genotypes.")
        dosage = pd.Series(geno.read(np.arange(len(geno.donors)), col)[:, 0], index=geno.donors)
        ref, alt = (c[col[0]] for c in allele_columns(geno.var))
    finally:
        geno.close()

    X = adata.layers[layer] if layer is not None else adata.X
    x = X[:, adata.var_names.get_loc(gene)]
    x = x.toarray().ravel() if sparse.issparse(x) else np.asarray(x, dtype=np.float64).ravel()
    cells = pd.DataFrame({"expr": x, "donor": adata.obs[donor_key].astype(str).to_numpy()})
    cells["group"] = adata.obs[groupby].astype(str).to_numpy() if groupby is not None else ""
    cells["dosage"] = dosage.reindex(cells["donor"]).to_numpy()
    cells = cells[np.isfinite(cells["dosage"])]
    if cells.empty:
        raise ValueError(f"no cell's donor has an observed dosage of {variant!r} in the genotypes.")
    cells["cls"] = np.clip(np.rint(cells["dosage"]), 0, 2).astype(int)
    points = (
        cells.groupby(["group", "donor", "cls"], observed=True)["expr"].mean().reset_index()
        if per == "donor"
        else cells
    )
    groups = (
        [str(g) for g in adata.obs[groupby].astype("category").cat.categories if str(g) in set(points["group"])]
        if groupby is not None
        else [""]
    )
    ax = new_axes(ax, figsize=(4.5 + 1.2 * max(0, len(groups) - 1), 4.0))
    width = 0.8 / len(groups)
    rng = np.random.default_rng(0)
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    for j, g in enumerate(groups):
        at = points[points["group"] == g]
        for cls in range(3):
            vals = at.loc[at["cls"] == cls, "expr"].to_numpy()
            if not len(vals):
                continue
            centre = cls - 0.4 + width * (j + 0.5)
            ax.boxplot(vals, positions=[centre], widths=width * 0.8, showfliers=False, manage_ticks=False)
            jitter = rng.uniform(-width * 0.3, width * 0.3, len(vals))
            ax.scatter(centre + jitter, vals, s=8, color=cmap(j % 10), alpha=0.6)
    names = ["0", "1", "2"]
    if isinstance(ref, str) and isinstance(alt, str):
        names = [f"{ref}/{ref}", f"{ref}/{alt}", f"{alt}/{alt}"]
    ax.set_xticks([0, 1, 2])
    ax.set_xticklabels(names)
    ax.set_xlim(-0.6, 2.6)
    ax.set_xlabel(f"{variant} ({'copies of ' + alt if isinstance(alt, str) else 'dosage'})")
    ax.set_ylabel(f"{gene} expression ({'donor mean' if per == 'donor' else 'cell'})")
    if groupby is not None:
        handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(j % 10), label=g) for j, g in enumerate(groups)]
        ax.legend(handles=handles, title=groupby, frameon=False, fontsize="small")
    return finish(ax, f"expression_by_genotype_{gene}", show, save)


def draw_gene_bodies(ax, adata: AnnData, gene: str, chrom_key: str, start_key: str, end_key: str | None) -> None:
    """Gene bodies (``start``..``end`` of ``adata.var``, a tick where ``end`` is missing) of the genes in view on
    ``gene``'s chromosome, below the association track; ``gene`` in red."""
    var = adata.var
    if chrom_key not in var.columns or start_key not in var.columns:
        return
    lo, hi = ax.get_xlim()
    chrom = normalise_chrom(var[chrom_key])
    start = var[start_key].to_numpy(dtype=np.float64) / 1e6
    end = var[end_key].to_numpy(dtype=np.float64) / 1e6 if end_key and end_key in var.columns else start.copy()
    end = np.where(np.isfinite(end), end, start)
    left, right = np.minimum(start, end), np.maximum(start, end)
    me = var.index.get_loc(gene)
    show = (chrom == chrom[me]) & np.isfinite(start) & (right >= lo) & (left <= hi)
    top = max(ax.get_ylim()[1], 1.0)
    step = 0.08 * top
    rows_end: list[float] = []
    for i in np.flatnonzero(show)[np.argsort(left[show])]:
        row = next((r for r, e in enumerate(rows_end) if left[i] > e), len(rows_end))
        label_end = right[i] + 0.06 * (hi - lo)
        if row == len(rows_end):
            rows_end.append(label_end)
        else:
            rows_end[row] = label_end
        y = -step * (row + 1)
        colour = "tab:red" if i == me else "0.35"
        ax.plot(
            [left[i], max(right[i], left[i] + 0.002 * (hi - lo))], [y, y], color=colour, lw=4, solid_capstyle="butt"
        )
        ax.annotate(str(var.index[i]), (right[i], y), textcoords="offset points", xytext=(3, -3), fontsize="x-small",
                    color=colour)  # fmt: skip
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=-step * (len(rows_end) + 1), top=ax.get_ylim()[1])
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set_yticks([t for t in ax.get_yticks() if t >= 0])
