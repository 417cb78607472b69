"""Gene-level FDR (Benjamini-Hochberg against statsmodels, Storey's pi0 against hand computations), q-values and
eGenes in cis_map, and independent signals (cis_map(independent=True)) against the conditional score test."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import interpolate

import scverse_nullfit as snf
from scverse_nullfit._core import _fdr
from scverse_nullfit.tl._cis_map import acat

from .conftest import COVARIATES, DONOR_COVARIATES

# ---------------------------------------------------------------------------------------------------------------
# q-values
# ---------------------------------------------------------------------------------------------------------------


def test_bh_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=300), rng.beta(0.2, 8, size=100), [0.01, 0.01, 0.5, 1.0, 0.0]])
    rng.shuffle(p)
    expected = multitest.multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(_fdr.bh(p), expected, rtol=1e-13)
    with_nan = np.concatenate([p[:50], [np.nan], p[50:]])
    got = _fdr.bh(with_nan)
    assert np.isnan(got[50])
    np.testing.assert_allclose(np.delete(got, 50), expected, rtol=1e-13)  # NaN is not counted in m
    q, pi0 = _fdr.qvalues(p, "bh")
    assert pi0 == 1.0
    np.testing.assert_allclose(q, expected, rtol=1e-13)


def test_storey_pi0_hand_computed():
    p = np.array([0.001, 0.01, 0.02, 0.2, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9])
    # pi0(0.5) = #{p >= 0.5} / (10 * 0.5) = 4 / 5
    assert _fdr.pi0_storey(p, lambdas=[0.5]) == pytest.approx(0.8)
    np.testing.assert_allclose(_fdr.pi0_lambda(p, [0.25, 0.5, 0.75]), [6 / 7.5, 4 / 5, 1 / 2.5])
    # bootstrap (qvalue's closed form) on lambda = 0.25, 0.5, 0.75: pi0 = 0.8, 0.8, 0.4, W = 6, 4, 1
    lam = np.array([0.25, 0.5, 0.75])
    pi0, W = np.array([0.8, 0.8, 0.4]), np.array([6, 4, 1])
    q10 = 0.4 + 0.1 * 2 * (0.8 - 0.4)  # R's quantile type 7 of (0.4, 0.8, 0.8) at 0.1
    mse = W / (100 * (1 - lam) ** 2) * (1 - W / 10) + (pi0 - q10) ** 2
    assert _fdr.pi0_storey(p, "bootstrap", lam) == pytest.approx(pi0[np.argmin(mse)])
    # the q-values are pi0 times Benjamini-Hochberg (qvalue's pi0 * pmin(1, cummin(p m / i)))
    q, used = _fdr.qvalues(p, "storey_bootstrap")
    assert used == _fdr.pi0_storey(p, "bootstrap")
    np.testing.assert_allclose(q, used * _fdr.bh(p), rtol=1e-14)
    # every p-value tiny: an estimate <= 0 falls back to 1 (Benjamini-Hochberg)
    assert _fdr.pi0_storey(np.full(20, 1e-4)) == 1.0


def test_storey_smoother_is_a_three_df_spline():
    lam = _fdr.LAMBDAS
    np.testing.assert_allclose(lam, np.arange(1, 20) * 0.05)
    eye = np.eye(len(lam))
    fitted = np.column_stack([_fdr.smooth_df(lam, eye[i]) for i in range(len(lam))])
    assert np.trace(fitted) == pytest.approx(3.0, abs=1e-8)  # R's smooth.spline(lambda, pi0, df = 3)
    line = 0.2 + 0.5 * lam
    np.testing.assert_allclose(_fdr.smooth_df(lam, line), line, atol=1e-12)  # splines keep straight lines
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(size=2000), rng.beta(0.1, 10, size=500)])
    pi0_lam = _fdr.pi0_lambda(p)
    lam_pen = _fdr._penalty(tuple(lam), 3.0)
    expected = interpolate.make_smoothing_spline(lam, pi0_lam, lam=lam_pen)(lam[-1])
    assert _fdr.pi0_storey(p) == pytest.approx(min(1.0, expected))
    assert 0.7 < _fdr.pi0_storey(p) < 0.9  # true pi0 = 0.8
    q, pi0 = _fdr.qvalues(p)
    np.testing.assert_allclose(q, pi0 * _fdr.bh(p), rtol=1e-14)
    with pytest.raises(ValueError, match="fdr_method"):
        _fdr.qvalues(p, "nope")


# ---------------------------------------------------------------------------------------------------------------
# cis_map: q-values, eGenes and independent signals
# ---------------------------------------------------------------------------------------------------------------


def _genotype_adata(dosages: pd.DataFrame, variants: pd.DataFrame) -> ad.AnnData:
    g = ad.AnnData(X=dosages.to_numpy(dtype=np.float64), obs=pd.DataFrame(index=dosages.index.astype(str)))
    g.var_names = dosages.columns.astype(str)
    g.var["chrom"] = variants.loc[g.var_names, "chrom"].astype(str).to_numpy()
    g.var["pos"] = variants.loc[g.var_names, "pos"].to_numpy(np.int64)
    return g


@pytest.fixture(scope="module")
def two_signals():
    """Gene 0 with two causal cis variants, gene 1 with one, the rest without; fitted."""
    adata = snf.datasets.simulate(n_donors=150, cells_per_donor=6.0, n_genes=12, n_cis_variants=15, frac_null=0.0,
                                  h2_range=(0.2, 0.4), seed=3)  # fmt: skip
    geno, variants = adata.uns["genotypes"], adata.uns["variants"]
    donors = adata.obs["donor_id"].astype(str).to_numpy()
    X = np.asarray(adata.X, dtype=np.float64).copy()
    causal = {0: {"gene00000_v2": 2.5, "gene00000_v9": -2.5}, 1: {"gene00001_v5": 2.0}}
    moderate = {j: {f"gene{j:05d}_v3": 0.6} for j in range(2, 6)}  # eGenes near the threshold
    for j, effects in {**causal, **moderate}.items():
        for v, b in effects.items():
            g = geno[v]
            X[:, j] += b * (g - g.mean()).loc[donors].to_numpy()
    adata.X = X
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    return adata, _genotype_adata(geno, variants), causal


def test_cis_map_qvalues_and_egenes(two_signals):
    adata, genotypes, _ = two_signals
    out = snf.tl.cis_map(adata, genotypes, copy=True)
    summary = snf.get.cis_genes_df(out)
    params = out.uns["cis"]["params"]
    q, pi0 = _fdr.qvalues(summary["pval_acat"].to_numpy())
    np.testing.assert_allclose(summary["qval"], q, rtol=1e-14)
    qb, pi0_b = _fdr.qvalues(summary["top_pval_bonf"].to_numpy())
    np.testing.assert_allclose(summary["qval_bonf"], qb, rtol=1e-14)
    assert (params["pi0"], params["pi0_bonf"], params["fdr"], params["fdr_method"]) == (pi0, pi0_b, 0.05, "storey")
    np.testing.assert_array_equal(summary["is_egene"], summary["qval"] <= 0.05)
    assert summary["is_egene"].iloc[:2].all()
    assert params["n_egenes"] == summary["is_egene"].sum()
    assert params["egene_pval_threshold"] == summary.loc[summary["is_egene"], "pval_acat"].max()
    # the accessor calls eGenes at another FDR from the stored q-values
    loose = snf.get.cis_genes_df(out, fdr=0.5)
    np.testing.assert_array_equal(loose["is_egene"], summary["qval"] <= 0.5)
    with pytest.raises(ValueError, match="fdr"):
        snf.get.cis_genes_df(out, fdr=2)
    bh = snf.tl.cis_map(adata, genotypes, fdr_method="bh", gene_pval="bonf", fdr=0.1, copy=True)
    summary = snf.get.cis_genes_df(bh)
    np.testing.assert_allclose(summary["qval_bonf"], _fdr.bh(summary["top_pval_bonf"].to_numpy()), rtol=1e-14)
    np.testing.assert_array_equal(summary["is_egene"], summary["qval_bonf"] <= 0.1)
    np.testing.assert_array_equal(snf.get.cis_genes_df(bh, fdr=0.3)["is_egene"], summary["qval_bonf"] <= 0.3)
    for bad in ({"fdr": 0}, {"fdr_method": "by"}, {"gene_pval": "min"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            snf.tl.cis_map(adata, genotypes, copy=True, **bad)


@pytest.mark.parametrize("gene_pval", ["acat", "bonf"])
def test_independent_signals(two_signals, gene_pval, tmp_path):
    adata, genotypes, causal = two_signals
    out = snf.tl.cis_map(adata, genotypes, independent=True, gene_pval=gene_pval, copy=True)
    table = snf.get.cis_independent_df(out)
    assert list(table.columns) == ["gene", "rank", "variant", "chrom", "pos", "distance", "ref", "alt", "af",
                                   "ma_samples", "ma_count", "n_donors", "n_cells", "score", "score_var", "z",
                                   "pval", "beta", "se", "pval_gene", "n_conditioned"]  # fmt: skip
    # the variant columns are those of the cis table
    cis = snf.get.cis_df(out).drop_duplicates("variant").set_index("variant")
    np.testing.assert_array_equal(table["af"], cis.loc[table["variant"], "af"])
    summary = snf.get.cis_genes_df(out)
    assert set(table["gene"].astype(str)) <= set(summary.index[summary["is_egene"]])
    for j, effects in causal.items():
        gene = adata.var_names[j]
        rows = table[table["gene"] == gene]
        assert set(rows["variant"].astype(str)) == set(effects), rows
        np.testing.assert_array_equal(rows["rank"], np.arange(1, len(effects) + 1))
        assert (np.sign(rows["beta"].to_numpy()) == np.sign([effects[v] for v in rows["variant"].astype(str)])).all()
        threshold = out.uns["cis"]["params"]["egene_pval_threshold"]
        assert (rows["pval_gene"] <= threshold).all()
        # each signal's statistics are the conditional score test given the gene's other signals
        signals = list(rows["variant"].astype(str))
        cis = snf.get.cis_df(out, genes=gene)
        for _, row in rows.iterrows():
            others = [v for v in signals if v != row["variant"]]
            ref = snf.tl.score_test(adata, genotypes[:, cis["variant"].astype(str)], genes=[gene],
                                    condition=others or None)  # fmt: skip
            ref = ref.set_index(ref["variant"].astype(str))
            for col in ["score", "score_var", "z", "pval", "beta", "se"]:
                assert row[col] == pytest.approx(ref.loc[row["variant"], col], rel=1e-9)
            assert row["n_conditioned"] == len(others)
            p = ref["pval"].to_numpy()
            expected = acat(p) if gene_pval == "acat" else min(1.0, np.nanmin(p) * len(cis))
            assert row["pval_gene"] == pytest.approx(expected, rel=1e-9)
    # round trip
    path = tmp_path / "cis.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(snf.get.cis_independent_df(back), table, check_categorical=False)


def test_independent_without_egenes_and_accessor_errors(fitted):
    variants = fitted.uns["variants"]
    genotypes = _genotype_adata(fitted.uns["genotypes"], variants)
    out = snf.tl.cis_map(fitted, genotypes, fdr=1e-12, independent=True, copy=True)
    assert out.uns["cis"]["params"]["n_egenes"] == 0
    assert np.isnan(out.uns["cis"]["params"]["egene_pval_threshold"])
    table = snf.get.cis_independent_df(out)
    assert len(table) == 0 and "rank" in table.columns
    plain = snf.tl.cis_map(fitted, genotypes, copy=True)
    with pytest.raises(KeyError, match="independent=True"):
        snf.get.cis_independent_df(plain)
    with pytest.raises(KeyError, match="nope"):
        snf.get.cis_independent_df(plain, genes="nope") if False else snf.get.cis_independent_df(out, genes="nope")
