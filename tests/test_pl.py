"""snf.pl: QQ plot with lambda_GC, h2 histogram, cis locus plot; scanpy-style show/save/ax."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from matplotlib.axes import Axes
from scipy import stats

import scverse_nullfit as snf


@pytest.fixture(scope="module")
def mapped(fitted):
    snf.tl.cis_map(fitted, fitted.uns["genotypes"], variants=fitted.uns["variants"])
    return fitted


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_lambda_gc():
    p = np.array([0.01, 0.2, 0.5, 0.7, np.nan])
    expected = np.median(stats.chi2.isf(p[:4], 1)) / stats.chi2.ppf(0.5, 1)
    assert snf.pl.lambda_gc(p) == pytest.approx(expected, rel=1e-12)
    assert snf.pl.lambda_gc(np.linspace(0.0005, 0.9995, 1000)) == pytest.approx(1.0, abs=0.01)


def test_qq_from_anndata_dataframe_array_and_dict(mapped):
    ax = snf.pl.qq(mapped, show=False)
    assert isinstance(ax, Axes)
    lam = snf.pl.lambda_gc(snf.get.cis_df(mapped)["pval"])
    assert any(f"λ_GC = {lam:.3f}" in t for t in _legend_texts(ax))

    table = snf.get.cis_df(mapped)
    assert isinstance(snf.pl.qq(table, show=False), Axes)
    rng = np.random.default_rng(0)
    _, ax = plt.subplots()
    out = snf.pl.qq({"lmm": table["pval"], "uniform": rng.uniform(size=50_000)}, ax=ax, show=False, ci=None)
    assert out is ax
    texts = _legend_texts(ax)
    assert any(t.startswith("lmm (λ_GC") for t in texts) and any(t.startswith("uniform (λ_GC") for t in texts)
    with pytest.raises(ValueError, match="p-values"):
        snf.pl.qq(np.array([0.5, 1.5]), show=False)


def test_h2_hist(mapped):
    ax = snf.pl.h2_hist(mapped, show=False, bins=10)
    assert isinstance(ax, Axes)
    n_zero = int((snf.get.nullfit_df(mapped)["h2"] == 0).sum())
    assert any(t.startswith(f"{n_zero} of {mapped.n_vars} genes") for t in _legend_texts(ax))
    assert sum(p.get_height() for p in ax.patches) == mapped.n_vars


def test_cis_locus(mapped):
    gene = mapped.var_names[0]
    ax = snf.pl.cis_locus(mapped, gene, show=False)
    assert isinstance(ax, Axes)
    assert gene in ax.get_title() and "ACAT" in ax.get_title()
    n = len(snf.get.cis_df(mapped, genes=gene))
    assert ax.collections[0].get_offsets().shape[0] == n
    with pytest.raises(KeyError, match="nope"):
        snf.pl.cis_locus(mapped, "nope", show=False)


@pytest.fixture
def figdir(tmp_path):
    old = sc.settings.figdir
    sc.settings.figdir = tmp_path
    yield tmp_path
    sc.settings.figdir = old


def test_save_to_figdir(mapped, figdir):
    tmp_path = figdir
    assert snf.pl.qq(mapped, save="_test.png") is None
    assert (tmp_path / "qq_test.png").is_file()
    ax = snf.pl.h2_hist(mapped, save=True, show=False)
    assert isinstance(ax, Axes)
    assert (tmp_path / f"h2_hist.{sc.settings.file_format_figs}").is_file()
    snf.pl.cis_locus(mapped, mapped.var_names[1], save=".svg")
    assert (tmp_path / f"cis_locus_{mapped.var_names[1]}.svg").is_file()


def test_qq_accepts_series_with_nan():
    s = pd.Series([0.1, np.nan, 0.3, 0.9])
    ax = snf.pl.qq(s, show=False, label="x")
    assert ax.collections[-1].get_offsets().shape[0] == 3


def test_qq_marker_size_applies_to_every_series():
    rng = np.random.default_rng(0)
    ax = snf.pl.qq({"a": rng.uniform(size=50), "b": rng.uniform(size=50)}, s=20, show=False)
    sizes = [c.get_sizes() for c in ax.collections if len(c.get_offsets()) == 50]
    assert len(sizes) == 2
    for s in sizes:
        np.testing.assert_array_equal(s, [20])


def test_manhattan_gene_and_variant_levels(mapped):
    ax = snf.pl.manhattan(mapped, show=False, threshold=0.05)
    assert isinstance(ax, Axes)
    tested = snf.get.cis_genes_df(mapped, tested_only=True)
    assert sum(len(c.get_offsets()) for c in ax.collections) == int(np.isfinite(tested["pval_acat"]).sum())
    assert [t.get_text() for t in ax.get_xticklabels()] == sorted(set(mapped.var["chrom"].astype(str)), key=int)
    ax = snf.pl.manhattan(mapped, level="variant", show=False)
    assert sum(len(c.get_offsets()) for c in ax.collections) == int(np.isfinite(snf.get.cis_df(mapped)["pval"]).sum())
    res = snf.tl.score_test(mapped, mapped.uns["genotypes"].iloc[:, :6])
    ax = snf.pl.manhattan(res, variants=mapped.uns["variants"], show=False)
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(res)
    with pytest.raises(KeyError, match="variants"):
        snf.pl.manhattan(res, show=False)
    with pytest.raises(ValueError, match="level"):
        snf.pl.manhattan(mapped, level="chromosome", show=False)


def test_expression_by_genotype(mapped):
    gene = mapped.var_names[0]
    variant = snf.get.cis_genes_df(mapped).loc[gene, "top_variant"]
    ax = snf.pl.expression_by_genotype(mapped, gene, variant, mapped.uns["genotypes"], show=False)
    n_donors = mapped.obs["donor_id"].nunique()
    assert sum(len(c.get_offsets()) for c in ax.collections) == n_donors
    ax = snf.pl.expression_by_genotype(
        mapped, gene, variant, mapped.uns["genotypes"], groupby="cell_type", per="cell", show=False
    )
    assert sum(len(c.get_offsets()) for c in ax.collections) == mapped.n_obs
    assert ax.get_legend().get_title().get_text() == "cell_type"
    with pytest.raises(KeyError, match="nope"):
        snf.pl.expression_by_genotype(mapped, gene, "nope", mapped.uns["genotypes"], show=False)


def test_cis_locus_draws_gene_bodies(mapped):
    adata = mapped.copy()
    adata.var["end"] = adata.var["start"] + 40_000
    gene = adata.var_names[0]
    ax = snf.pl.cis_locus(adata, gene, show=False)
    texts = [t.get_text() for t in ax.texts]
    assert gene in texts
    same_chrom = adata.var.index[(adata.var["chrom"] == adata.var.loc[gene, "chrom"])]
    lo, hi = ax.get_xlim()
    in_view = [g for g in same_chrom if lo <= adata.var.loc[g, "start"] / 1e6 <= hi]
    assert set(in_view) <= set(texts)
    assert ax.get_ylim()[0] < 0
    ax = snf.pl.cis_locus(adata, gene, gene_bodies=False, show=False)
    assert gene not in [t.get_text() for t in ax.texts]
