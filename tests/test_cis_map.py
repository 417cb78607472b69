"""snf.tl.cis_map: windows, ACAT, storage and accessors, power, donor order, PLINK input."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import scverse_nullfit as snf
from scverse_nullfit.io import read_plink_genotypes
from scverse_nullfit.tl._cis_map import acat

from .conftest import COVARIATES, DONOR_COVARIATES

STAT_COLUMNS = ["score", "score_var", "z", "pval", "beta", "se"]
VARIANT_COLUMNS = ["ref", "alt", "af", "ma_samples", "ma_count", "n_donors", "n_cells"]


def _genotype_adata(dosages: pd.DataFrame, chrom, pos) -> ad.AnnData:
    g = ad.AnnData(X=dosages.to_numpy(dtype=np.float64), obs=pd.DataFrame(index=dosages.index.astype(str)))
    g.var_names = dosages.columns.astype(str)
    g.var["chrom"] = list(chrom)
    g.var["pos"] = np.asarray(pos, dtype=np.int64)
    return g


@pytest.fixture(scope="module")
def genotypes(fitted):
    variants = fitted.uns["variants"]
    return _genotype_adata(fitted.uns["genotypes"], variants["chrom"], variants["pos"])


# ---------------------------------------------------------------------------------------------------------------
# ACAT
# ---------------------------------------------------------------------------------------------------------------


def test_acat_hand_computed():
    p = np.array([0.02, 0.3, 0.7])
    T = np.mean(np.tan((0.5 - p) * np.pi))
    assert acat(p) == pytest.approx(0.5 - np.arctan(T) / np.pi, rel=1e-12)
    assert acat([0.4]) == pytest.approx(0.4, rel=1e-12)
    assert acat([1e-20]) == pytest.approx(1e-20, rel=1e-8)  # no loss of digits in the tail
    assert acat([1e-30, 0.5, 0.9]) == pytest.approx(3e-30, rel=1e-6)  # T ~ 1/(3 pi 1e-30)
    assert acat([0.0, 0.5]) == 0.0
    assert acat([0.02, np.nan, 0.3, 0.7]) == pytest.approx(acat(p), rel=1e-15)
    assert np.isnan(acat([np.nan]))
    grouped = acat([0.02, 0.3, 0.7, 0.4, np.nan], groups=[0, 0, 0, 1, 2], n_groups=4)
    np.testing.assert_allclose(grouped[:2], [acat(p), 0.4], rtol=1e-12)
    assert np.isnan(grouped[2:]).all()


# ---------------------------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------------------------


def test_window_edges_chromosomes_and_chr_prefix(fitted):
    adata = fitted.copy()
    g1, g2 = adata.var_names[:2]
    adata.var["chrom"] = adata.var["chrom"].astype(object)
    adata.var.loc[g1, ["chrom", "start"]] = ["1", 5_000_000]
    adata.var.loc[g2, ["chrom", "start"]] = ["chr2", 5_000_000]
    spec = {
        "lo_edge": ("chr1", 4_000_000),  # gene - window: in
        "hi_edge": ("1", 6_000_000),  # gene + window: in
        "centre": ("CHR1", 5_000_000),  # in
        "lo_out": ("1", 3_999_999),  # out
        "hi_out": ("chr1", 6_000_001),  # out
        "other_chrom": ("3", 5_000_000),  # out for both
        "on_2": ("2", 5_000_500),  # gene 2 only
    }
    dosages = fitted.uns["genotypes"].iloc[:, : len(spec)].copy()
    dosages.columns = list(spec)
    geno = _genotype_adata(dosages, [c for c, _ in spec.values()], [p for _, p in spec.values()])
    snf.tl.cis_map(adata, geno, window=1_000_000, genes=[g1, g2])
    table = snf.get.cis_df(adata)
    got = {g: set(table.loc[table["gene"] == g, "variant"].astype(str)) for g in (g1, g2)}
    assert got == {g1: {"lo_edge", "hi_edge", "centre"}, g2: {"on_2"}}
    rows = table[table["gene"] == g1]
    assert list(rows["variant"].astype(str)) == ["lo_edge", "centre", "hi_edge"]  # sorted by position
    np.testing.assert_array_equal(rows["distance"], [-1_000_000, 0, 1_000_000])
    summary = snf.get.cis_genes_df(adata)
    assert summary.loc[g1, "n_variants"] == 3 and summary.loc[g2, "n_variants"] == 1
    assert (summary.loc[adata.var_names[2:], "n_variants"] == 0).all()
    assert summary.loc[adata.var_names[2:], "pval_acat"].isna().all()

    # the same variants as a DataFrame with a positions table
    other = adata.copy()
    snf.tl.cis_map(other, dosages, variants=geno.var, window=1_000_000, genes=[g1, g2])
    pd.testing.assert_frame_equal(snf.get.cis_df(other), table)


def test_results_equal_score_test_and_summary_is_consistent(fitted, genotypes):
    adata = fitted.copy()
    snf.tl.cis_map(adata, genotypes, window=500_000)
    table = snf.get.cis_df(adata)
    assert list(table.columns) == ["gene", "variant", "chrom", "pos", "distance", *VARIANT_COLUMNS, *STAT_COLUMNS]
    assert (table["distance"].abs() <= 500_000).all()
    full = snf.tl.score_test(adata, fitted.uns["genotypes"])
    merged = table.astype({"gene": str, "variant": str}).merge(
        full.astype({"gene": str, "variant": str}), on=["gene", "variant"], suffixes=("", "_full")
    )
    assert len(merged) == len(table)
    for col in STAT_COLUMNS:
        np.testing.assert_allclose(merged[col], merged[f"{col}_full"], rtol=1e-10)

    summary = snf.get.cis_genes_df(adata, tested_only=True)
    for gene, rows in table.groupby("gene", observed=True):
        s = summary.loc[gene]
        p = rows["pval"].to_numpy()
        p = p[np.isfinite(p)]  # monomorphic variants give NaN and are left out
        T = np.mean(np.tan((0.5 - p) * np.pi))
        assert s["pval_acat"] == pytest.approx(0.5 - np.arctan(T) / np.pi, rel=1e-9)
        assert s["n_variants"] == len(rows)
        best = rows.iloc[int(np.nanargmin(rows["pval"]))]
        assert s["top_variant"] == best["variant"] and s["top_pval"] == best["pval"]
        assert s["top_pval_bonf"] == pytest.approx(min(1.0, best["pval"] * len(rows)))


def test_donor_order_invariance_and_missing_donor(fitted, genotypes):
    expected = fitted.copy()
    snf.tl.cis_map(expected, genotypes)
    order = np.random.default_rng(1).permutation(genotypes.n_obs)
    shuffled = genotypes[order].copy()
    got = snf.tl.cis_map(fitted, shuffled, copy=True)
    pd.testing.assert_frame_equal(snf.get.cis_df(got), snf.get.cis_df(expected), rtol=1e-12)
    pd.testing.assert_frame_equal(snf.get.cis_genes_df(got), snf.get.cis_genes_df(expected), rtol=1e-12)
    assert "cis" not in fitted.uns  # copy=True leaves the input alone
    with pytest.raises(ValueError, match="D0003"):
        snf.tl.cis_map(fitted, genotypes[genotypes.obs_names != "D0003"].copy(), copy=True)


def test_survives_h5ad(fitted, genotypes, tmp_path):
    adata = fitted.copy()
    snf.tl.cis_map(adata, genotypes, key_added="cis_1mb")
    adata.write_h5ad(tmp_path / "cis.h5ad")
    back = ad.read_h5ad(tmp_path / "cis.h5ad")
    pd.testing.assert_frame_equal(snf.get.cis_df(back, "cis_1mb"), snf.get.cis_df(adata, "cis_1mb"))
    pd.testing.assert_frame_equal(snf.get.cis_genes_df(back, "cis_1mb"), snf.get.cis_genes_df(adata, "cis_1mb"))
    assert back.uns["cis_1mb"]["params"]["window"] == 1_000_000
    one = snf.get.cis_df(back, "cis_1mb", genes=back.var_names[0])
    assert set(one["gene"].astype(str)) == {back.var_names[0]}
    with pytest.raises(KeyError, match="cis"):
        snf.get.cis_df(back)


def test_bad_inputs(fitted, genotypes):
    with pytest.raises(KeyError, match="tss"):
        snf.tl.cis_map(fitted, genotypes, pos_key="tss", copy=True)
    with pytest.raises(KeyError, match="chrom"):
        snf.tl.cis_map(fitted, fitted.uns["genotypes"], copy=True)  # a DataFrame without variant positions
    with pytest.raises(ValueError, match="window"):
        snf.tl.cis_map(fitted, genotypes, window=-1, copy=True)
    with pytest.raises(ValueError, match="overwrite"):
        snf.tl.cis_map(fitted, genotypes, key_added="nullfit", copy=True)


def test_power_finds_the_causal_variant():
    adata = snf.datasets.simulate(
        n_donors=120, cells_per_donor=10.0, n_genes=20, frac_eqtl=0.5, eqtl_effect=1.5, frac_null=0.0, seed=5
    )
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    variants = adata.uns["variants"]
    snf.tl.cis_map(adata, _genotype_adata(adata.uns["genotypes"], variants["chrom"], variants["pos"]))
    summary = snf.get.cis_genes_df(adata)
    causal = adata.var["eqtl_variant"] != ""
    assert causal.sum() == 10
    np.testing.assert_array_equal(summary.loc[causal, "top_variant"].astype(str), adata.var.loc[causal, "eqtl_variant"])
    assert (summary.loc[causal, "pval_acat"] < 1e-4).all()
    assert (summary.loc[causal, "top_beta"] > 0).all()
    # the null genes stay unremarkable
    assert stats.kstest(summary.loc[~causal, "pval_acat"], "uniform").pvalue > 1e-3


def test_plink_input(fitted, genotypes, tmp_path):
    bed_reader = pytest.importorskip("bed_reader")
    sub = genotypes[:, :60]
    X = sub.X.copy()
    X[3, 5] = np.nan  # a missing call
    prefix = tmp_path / "geno"
    bed_reader.to_bed(
        f"{prefix}.bed",
        X,
        properties={
            "iid": list(sub.obs_names),
            "sid": list(sub.var_names),
            "chromosome": [f"chr{c}" for c in sub.var["chrom"]],
            "bp_position": list(sub.var["pos"]),
        },
    )
    read = read_plink_genotypes(prefix)
    assert read.shape == sub.shape and list(read.obs_names) == list(sub.obs_names)
    np.testing.assert_array_equal(read.var["pos"], sub.var["pos"])
    np.testing.assert_array_equal(np.isnan(read.X), np.isnan(X))
    np.testing.assert_array_equal(np.nan_to_num(read.X, nan=-1), np.nan_to_num(X, nan=-1))
    picked = read_plink_genotypes(f"{prefix}.bed", donors=["D0002", "D0000"], variants=list(sub.var_names[[4, 1]]))
    np.testing.assert_array_equal(picked.X, X[[2, 0]][:, [4, 1]])

    with_nan = sub.copy()
    with_nan.X = X
    expected = snf.tl.cis_map(fitted, with_nan, copy=True)
    got = snf.tl.cis_map(fitted, prefix, copy=True)
    pd.testing.assert_frame_equal(
        snf.get.cis_df(got).drop(columns=["chrom", "ref", "alt"]),
        snf.get.cis_df(expected).drop(columns=["chrom", "ref", "alt"]),
        rtol=1e-12,
    )
    # PLINK counts allele 1 of the .bim: it is alt in the table
    bim = pd.read_csv(f"{prefix}.bim", sep="\t", header=None, index_col=1)
    table = snf.get.cis_df(got)
    np.testing.assert_array_equal(table["alt"].astype(str), bim.loc[table["variant"].astype(str), 4].astype(str))
    np.testing.assert_array_equal(table["ref"].astype(str), bim.loc[table["variant"].astype(str), 5].astype(str))
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_plink_genotypes(tmp_path / "nothere")


def test_blocks_and_chunks_do_not_change_results(fitted, genotypes, monkeypatch):
    expected = snf.get.cis_df(snf.tl.cis_map(fitted, genotypes, copy=True))
    import scverse_nullfit.tl._cis_map as cis_module

    monkeypatch.setattr(cis_module, "MAX_BLOCK_GENES", 1)
    got = snf.get.cis_df(snf.tl.cis_map(fitted, genotypes, chunk_size=3, copy=True))
    pd.testing.assert_frame_equal(got, expected, rtol=1e-12)
