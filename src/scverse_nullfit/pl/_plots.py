"""Plots of null-model fits and association results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from .._docs import doc_ax_show, doc_null_result, doc_params, doc_plot_returns
from ._genetics import draw_gene_bodies
from ._utils import finish, new_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from numpy.typing import ArrayLike

#: Points of a QQ plot beyond this count are thinned in the bulk of the distribution (the tail is kept whole).
MAX_QQ_POINTS = 20_000


def lambda_gc(pvals: ArrayLike | pd.DataFrame, *, column: str = "pval") -> float:
    """Genomic-control inflation factor of p-values.

    The median of the 1-df chi-squared statistics of the p-values over its expectation under the null,
    ``median(chi2_1.isf(p)) / chi2_1.ppf(0.5)`` (1 for calibrated p-values).

    Parameters
    ----------
    pvals
        P-values: an array or Series, or a DataFrame such as the output of :func:`~scverse_nullfit.tl.score_test`
        (its ``column``). Non-finite values and values outside [0, 1] are ignored.
    column
        With a DataFrame: the column of p-values.

    Returns
    -------
    The inflation factor; NaN when no p-value is left.
    """
    if isinstance(pvals, pd.DataFrame):
        if column not in pvals.columns:
            raise KeyError(f"column {column!r} not in the DataFrame (columns: {list(pvals.columns)}).")
        pvals = pvals[column]
    p = np.asarray(pvals, dtype=np.float64).ravel()
    p = p[np.isfinite(p) & (p >= 0) & (p <= 1)]
    if not len(p):
        return float("nan")
    return float(np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1))


def _pvalues(data, key: str, column: str) -> np.ndarray:
    from anndata import AnnData

    if isinstance(data, AnnData):
        stored = data.uns.get(key)
        if isinstance(stored, pd.DataFrame):  # e.g. a score_test table kept in uns
            data = stored
        else:
            from ..get import cis_df

            data = cis_df(data, key)
    if isinstance(data, pd.DataFrame):
        if column not in data.columns:
            raise KeyError(f"column {column!r} not in the DataFrame (columns: {list(data.columns)}).")
        data = data[column]
    p = np.asarray(data, dtype=np.float64).ravel()
    p = p[np.isfinite(p)]
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1]; found values from {p.min():.3g} to {p.max():.3g}.")
    return p


def _thin(n: int) -> np.ndarray:
    """Ranks (0 = smallest p) to draw: all of the tail, a geometric sample of the bulk."""
    if n <= MAX_QQ_POINTS:
        return np.arange(n)
    head = MAX_QQ_POINTS // 2
    rest = np.unique(np.geomspace(head, n - 1, MAX_QQ_POINTS - head).astype(np.int64))
    return np.unique(np.concatenate([np.arange(head), rest]))


@doc_params(doc_ax_show=doc_ax_show, doc_plot_returns=doc_plot_returns, doc_null_result=doc_null_result)
def qq(
    data,
    *,
    key: str = "cis",
    column: str = "pval",
    ci: float | None = 0.95,
    label: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs,
) -> Axes | None:
    """Quantile-quantile plot of p-values against the uniform distribution, on the -log10 scale.

    The legend gives each series' genomic-control lambda, ``median(chi2_1.isf(p)) / chi2_1.ppf(0.5)``
    (1 for calibrated p-values).

    Parameters
    ----------
    data
        P-values: an array or Series, a DataFrame (its ``column``), an AnnData with results of
        :func:`~scverse_nullfit.tl.cis_map` under ``key`` (or a DataFrame such as a
        :func:`~scverse_nullfit.tl.score_test` table kept in ``adata.uns[key]``), or a dict of label -> any of these to
        overlay series.
    key
        With an AnnData: the ``key_added`` of :func:`~scverse_nullfit.tl.cis_map`, or the ``uns`` key of a stored
        DataFrame of p-values.
    column
        With a DataFrame or AnnData: the column of p-values.
    ci
        Level of the pointwise confidence band of the expected order statistics (Beta distribution);
        ``None`` for no band.
    label
        Legend label of a single series (default ``"p-values"``).
    {doc_ax_show}
    save
        Save the figure to ``settings.figdir``: ``True`` as ``qq.<settings.file_format_figs>``, or a string
        appended to ``qq`` (ending with ``.pdf``, ``.png`` or ``.svg`` to choose the format).
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    {doc_plot_returns}
    """
    series = dict(data) if isinstance(data, Mapping) else {label or "p-values": data}
    values = {str(name): _pvalues(d, key, column) for name, d in series.items()}
    ax = new_axes(ax)
    n_max = max((len(p) for p in values.values()), default=0)
    if ci is not None and n_max:
        if not 0 < ci < 1:
            raise ValueError(f"ci must be within (0, 1) or None, not {ci!r}.")
        k = _thin(n_max) + 1
        lo = stats.beta.ppf((1 - ci) / 2, k, n_max - k + 1)
        hi = stats.beta.ppf((1 + ci) / 2, k, n_max - k + 1)
        expected = -np.log10((k - 0.5) / n_max)
        ax.fill_between(expected, -np.log10(hi), -np.log10(lo), color="0.85", lw=0, label=f"{ci:.0%} band")
    top = 0.0
    tiny = np.finfo(np.float64).tiny
    kwargs.setdefault("s", 6)
    for name, p in values.items():
        if not len(p):
            continue
        n = len(p)
        k = _thin(n)
        obs = -np.log10(np.maximum(np.sort(p)[k], tiny))
        expected = -np.log10((k + 0.5) / n)
        ax.scatter(expected, obs, label=f"{name} (λ_GC = {lambda_gc(p):.3f})", **kwargs)
        top = max(top, expected.max())
    ax.plot([0, top], [0, top], color="0.3", lw=1, ls="--")
    ax.set_xlabel("expected -log10(p)")
    ax.set_ylabel("observed -log10(p)")
    ax.legend(loc="upper left", frameon=False, fontsize="small")
    return finish(ax, "qq", show, save)


@doc_params(doc_ax_show=doc_ax_show, doc_plot_returns=doc_plot_returns, doc_null_result=doc_null_result)
def h2_hist(
    adata: AnnData,
    *,
    key: str = "nullfit",
    bins: int = 30,
    converged_only: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs,
) -> Axes | None:
    """Histogram of the per-gene heritability ``h2 = tau / (1 + tau)`` of a null-model fit.

    ``h2`` is the fraction of a gene's residual variance (given the covariates) that is the donor genetic
    effect: ``sigma2_g / (sigma2_g + sigma2_e)``. The legend counts the genes at the boundary ``h2 = 0`` and
    gives the median.

    Parameters
    ----------
    {doc_null_result}
    bins
        Number of bins, over [0, 1] when the estimates spread over more than half of it, else over
        [0, the largest h2] (so that data with h2 near 0 is not one bar).
    converged_only
        Only the genes whose REML search converged.
    {doc_ax_show}
    save
        Save the figure to ``settings.figdir`` as ``h2_hist``, as in :func:`qq`.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.hist`.

    {doc_plot_returns}
    """
    from ..get import nullfit_df

    df = nullfit_df(adata, key)
    h2 = df["h2"].to_numpy(dtype=np.float64, na_value=np.nan)
    keep = np.isfinite(h2)
    if converged_only:
        keep &= df["converged"].fillna(False).to_numpy(dtype=bool)
    h2 = h2[keep]
    if not len(h2):
        raise ValueError(f"no fitted genes with a finite h2 under adata.varm[{key!r}].")
    ax = new_axes(ax)
    n_zero = int((h2 == 0).sum())
    top = float(h2.max())
    right = 1.0 if top > 0.5 else (top * 1.05 if top > 0 else 0.05)
    ax.hist(h2, bins=np.linspace(0, right, int(bins) + 1), color=kwargs.pop("color", "tab:blue"), **kwargs)
    ax.axvline(np.median(h2), color="0.2", ls="--", lw=1, label=f"median {np.median(h2):.3f}")
    ax.plot([], [], " ", label=f"{n_zero} of {len(h2)} genes at h2 = 0")
    ax.set_xlim(0, right)
    ax.set_xlabel("h2 = sigma2_g / (sigma2_g + sigma2_e)")
    ax.set_ylabel("genes")
    ax.legend(frameon=False, fontsize="small")
    return finish(ax, "h2_hist", show, save)


@doc_params(doc_ax_show=doc_ax_show, doc_plot_returns=doc_plot_returns, doc_null_result=doc_null_result)
def cis_locus(
    adata: AnnData,
    gene: str,
    *,
    key: str = "cis",
    annotate_top: bool = True,
    gene_bodies: bool = True,
    end_key: str = "end",
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs,
) -> Axes | None:
    """One gene's cis associations: variant position (Mb) against -log10 p.

    Draws the gene's position (dashed line) and window edges (dotted), marks the top variant, and gives the
    gene-level ACAT p-value in the title.

    Parameters
    ----------
    adata
        An AnnData on which :func:`~scverse_nullfit.tl.cis_map` has been run.
    gene
        The gene to draw.
    key
        The ``key_added`` of that call.
    annotate_top
        Label the top variant with its name.
    gene_bodies
        Draw the genes in view below the associations, from their start (the ``pos_key`` of ``cis_map``) to
        ``var[end_key]`` when ``var`` has it (else a tick at the start); the gene itself in red.
    end_key
        Column of ``adata.var`` with gene ends.
    {doc_ax_show}
    save
        Save the figure to ``settings.figdir`` as ``cis_locus_<gene>``, as in :func:`qq`.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    {doc_plot_returns}
    """
    from ..get import cis_df, cis_genes_df

    if gene not in adata.var_names:
        raise KeyError(f"gene {gene!r} is not in adata.var_names.")
    table = cis_df(adata, key, genes=gene)
    summary = cis_genes_df(adata, key).loc[gene]
    params = adata.uns[key].get("params", {})
    ax = new_axes(ax, figsize=(6.0, 3.5))
    pos = table["pos"].to_numpy(dtype=np.float64) / 1e6
    p = table["pval"].to_numpy(dtype=np.float64)
    mlp = -np.log10(np.maximum(p, np.finfo(np.float64).tiny))
    ax.scatter(pos, mlp, s=kwargs.pop("s", 12), color=kwargs.pop("color", "tab:blue"), **kwargs)
    pos_key = params.get("pos_key")
    if pos_key is not None and pos_key in adata.var.columns:
        gpos = float(adata.var.loc[gene, pos_key]) / 1e6
        if np.isfinite(gpos):
            ax.axvline(gpos, color="0.3", ls="--", lw=1)
            window = params.get("window")
            if window is not None:
                for edge in (gpos - float(window) / 1e6, gpos + float(window) / 1e6):
                    ax.axvline(edge, color="0.6", ls=":", lw=1)
    if len(table) and np.isfinite(p).any():
        i = int(np.nanargmin(p))
        ax.scatter([pos[i]], [mlp[i]], s=40, color="tab:red", zorder=3)
        if annotate_top:
            ax.annotate(
                str(table["variant"].iloc[i]),
                (pos[i], mlp[i]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="small",
            )
    if gene_bodies and pos_key is not None:
        draw_gene_bodies(ax, adata, gene, params.get("chrom_key", "chrom"), pos_key, end_key)
    chrom = str(table["chrom"].iloc[0]) if len(table) else ""
    ax.set_xlabel(f"chromosome {chrom} position (Mb)" if chrom else "position (Mb)")
    ax.set_ylabel("-log10(p)")
    ax.set_title(
        f"{gene}: ACAT p = {summary['pval_acat']:.3g} ({int(summary['n_variants'])} variants)", fontsize="medium"
    )
    return finish(ax, f"cis_locus_{gene}", show, save)
