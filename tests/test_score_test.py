"""snf.tl.score_test: exactness against a dense cell-level P, h5ad round trip, calibration, input handling."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

import scverse_nullfit as snf
from scverse_nullfit._core._design import align_grm, build_design, donor_labels

from .conftest import COVARIATES, DONOR_COVARIATES, dense_score

STAT_COLUMNS = ["score", "score_var", "z", "pval", "beta", "se"]
VARIANT_COLUMNS = ["ref", "alt", "af", "ma_samples", "ma_count", "n_donors", "n_cells"]


@pytest.fixture
def geno(fitted):
    return fitted.uns["genotypes"].iloc[:, :40].copy()


def _dense_oracle(adata, genotypes):
    """Score, variance and z from the dense cell-level P at the fitted tau and sigma2_e."""
    return {gene: (S, Var, S / np.sqrt(Var)) for gene, (S, Var) in dense_score(adata, genotypes).items()}


def test_matches_dense_cell_level_projection(fitted, geno):
    res = snf.tl.score_test(fitted, geno)
    assert list(res.columns) == ["gene", "variant", *VARIANT_COLUMNS, *STAT_COLUMNS]
    assert len(res) == fitted.n_vars * geno.shape[1]
    assert (fitted.varm["nullfit"]["tau"] == 0).any()  # the boundary is covered too
    oracle = _dense_oracle(fitted, geno)
    for gene, (S, Var, z) in oracle.items():
        rows = res[res["gene"] == gene]
        assert list(rows["variant"].astype(str)) == list(geno.columns)
        np.testing.assert_allclose(rows["score"], S, rtol=1e-8, atol=1e-10 * np.abs(S).max())
        np.testing.assert_allclose(rows["score_var"], Var, rtol=1e-8)
        np.testing.assert_allclose(rows["z"], z, rtol=1e-8, atol=1e-10 * np.abs(z).max())
        np.testing.assert_allclose(rows["beta"], S / Var, rtol=1e-8, atol=1e-10 * np.abs(S / Var).max())
        np.testing.assert_allclose(rows["se"], 1 / np.sqrt(Var), rtol=1e-8)
        np.testing.assert_allclose(rows["pval"], 2 * stats.norm.sf(np.abs(z)), rtol=1e-6)


def test_fixed_tau_matches_dense(geno):
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=3, seed=4)
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, tau=0.7)
    res = snf.tl.score_test(adata, geno)
    for gene, (S, Var, _) in _dense_oracle(adata, geno).items():
        rows = res[res["gene"] == gene]
        np.testing.assert_allclose(rows["score"], S, rtol=1e-8, atol=1e-10 * np.abs(S).max())
        np.testing.assert_allclose(rows["score_var"], Var, rtol=1e-8)


def test_h5ad_round_trip_without_expression(fitted, geno, tmp_path):
    expected = snf.tl.score_test(fitted, geno)
    path = tmp_path / "fit.h5ad"
    fitted.write_h5ad(path)

    gone = ad.read_h5ad(path)
    gone.X = None
    pd.testing.assert_frame_equal(snf.tl.score_test(gone, geno), expected, check_exact=True)

    zeroed = ad.read_h5ad(path)
    zeroed.X = np.zeros(zeroed.shape, dtype=np.float32)
    pd.testing.assert_frame_equal(snf.tl.score_test(zeroed, geno), expected, check_exact=True)


def test_donor_order_extra_donors_and_anndata_input(fitted, geno):
    expected = snf.tl.score_test(fitted, geno)
    rng = np.random.default_rng(0)
    extra = pd.DataFrame(
        rng.integers(0, 3, (5, geno.shape[1])), index=[f"X{i}" for i in range(5)], columns=geno.columns
    )
    shuffled = pd.concat([geno, extra]).sample(frac=1.0, random_state=3)
    got = snf.tl.score_test(fitted, shuffled)
    pd.testing.assert_frame_equal(got, expected, rtol=1e-12)

    as_adata = ad.AnnData(X=shuffled.to_numpy(dtype=np.float64), obs=pd.DataFrame(index=shuffled.index))
    as_adata.var_names = shuffled.columns
    pd.testing.assert_frame_equal(snf.tl.score_test(fitted, as_adata), expected, rtol=1e-12)
    as_adata.X = sparse.csr_matrix(as_adata.X)
    pd.testing.assert_frame_equal(snf.tl.score_test(fitted, as_adata), expected, rtol=1e-12)


def test_missing_donor_is_an_error_naming_it(fitted, geno):
    with pytest.raises(ValueError, match="D0007"):
        snf.tl.score_test(fitted, geno.drop(index="D0007"))


def test_chunking_does_not_change_results(fitted, geno):
    expected = snf.tl.score_test(fitted, geno)
    pd.testing.assert_frame_equal(snf.tl.score_test(fitted, geno, chunk_size=7), expected, rtol=1e-12)


def test_missing_dosages_mean_imputed(fitted, geno):
    with_nan = geno.astype(float).copy()
    with_nan.iloc[[1, 5, 9], 0] = np.nan
    with_nan.iloc[2, 3] = np.nan
    imputed = with_nan.fillna(with_nan.loc[fitted.uns["nullfit"]["donors"]].mean())
    got, expected = snf.tl.score_test(fitted, with_nan), snf.tl.score_test(fitted, imputed)
    pd.testing.assert_frame_equal(got[STAT_COLUMNS], expected[STAT_COLUMNS], rtol=1e-12, check_exact=False)
    # the allele frequency is that of the observed dosages, unchanged by the imputation; the counts are not
    np.testing.assert_allclose(got["af"], expected["af"], rtol=1e-12)
    first = got["variant"] == geno.columns[0]
    assert (got.loc[first, "n_donors"] == expected.loc[first, "n_donors"] - 3).all()


def test_monomorphic_collinear_and_empty_variants_are_nan(fitted, geno):
    donors = pd.Index(fitted.uns["nullfit"]["donors"])
    sex = fitted.obs.groupby("donor_id", observed=True)["sex"].first().reindex(donors)
    g = geno.iloc[:, :3].copy().astype(float)
    g["mono"] = 1.0
    g["all_missing"] = np.nan
    g["like_sex"] = 2.0 * (sex == "M").to_numpy(float)
    res = snf.tl.score_test(fitted, g)
    bad = res["variant"].isin(["mono", "all_missing", "like_sex"])
    assert res.loc[bad, STAT_COLUMNS].isna().all().all()
    assert res.loc[~bad, STAT_COLUMNS].notna().all().all()


def test_genes_selection_and_unfitted_genes(geno):
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=5, seed=2)
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, genes=adata.var_names[:3])
    res = snf.tl.score_test(adata, geno.iloc[:, :4])
    assert list(res["gene"].cat.categories) == list(adata.var_names)
    unfitted = res["gene"].isin(adata.var_names[3:])
    assert res.loc[unfitted, STAT_COLUMNS].isna().all().all()
    assert res.loc[~unfitted, STAT_COLUMNS].notna().all().all()
    sub = snf.tl.score_test(adata, geno.iloc[:, :4], genes=[adata.var_names[1]])
    expected = res[res["gene"] == adata.var_names[1]].reset_index(drop=True)
    np.testing.assert_allclose(sub[STAT_COLUMNS].to_numpy(), expected[STAT_COLUMNS].to_numpy(), rtol=1e-12)


def test_bad_inputs(fitted, geno):
    with pytest.raises(KeyError, match="other"):
        snf.tl.score_test(fitted, geno, key="other")
    text = geno.copy()
    text["bad"] = "x"
    with pytest.raises(ValueError, match="'bad'"):
        snf.tl.score_test(fitted, text)
    with pytest.raises(ValueError, match="duplicated donor"):
        snf.tl.score_test(fitted, pd.concat([geno, geno.iloc[:1]]))
    with pytest.raises(ValueError, match="DataFrame"):
        snf.tl.score_test(fitted, geno.to_numpy())


def _lambda_gc(p):
    return np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1)


def test_calibrated_on_related_donors_where_naive_ols_is_inflated():
    adata = snf.datasets.simulate(
        n_donors=150, cells_per_donor=10.0, n_genes=60, n_cis_variants=10, h2_range=(0.2, 0.7), frac_null=0.0, seed=11
    )
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    geno = adata.uns["genotypes"]  # 600 variants drawn from the related donors' genomes; no true effects
    p = snf.tl.score_test(adata, geno)["pval"].to_numpy()
    assert np.isfinite(p).all()
    assert 0.035 < (p < 0.05).mean() < 0.065
    assert 0.9 < _lambda_gc(p) < 1.1

    # naive: OLS per cell (cells independent), same covariates plus the cell's donor dosage
    labels = donor_labels(adata.obs, "donor_id")
    _, donors = align_grm(adata.uns["grm"], labels, "test")
    X = build_design(adata.obs, COVARIATES, DONOR_COVARIATES, donors).X
    Q, _ = np.linalg.qr(X)
    Y = np.asarray(adata.X, dtype=np.float64)
    gc = geno.loc[donors.ids].to_numpy(dtype=np.float64)[donors.codes]
    ry, rg = Y - Q @ (Q.T @ Y), gc - Q @ (Q.T @ gc)
    df = X.shape[0] - X.shape[1] - 1
    xy, gg, yy = ry.T @ rg, (rg * rg).sum(axis=0), (ry * ry).sum(axis=0)
    t = (xy / gg) / np.sqrt((yy[:, None] - xy**2 / gg) / df / gg)
    p_naive = 2 * stats.t.sf(np.abs(t), df).ravel()
    assert (p_naive < 0.05).mean() > 0.15
    assert _lambda_gc(p_naive) > 2.0


class _ListReader:
    """A minimal genotype reader (the ``GenotypeReader`` interface new file formats implement)."""

    def __init__(self, frame: pd.DataFrame):
        self.donors = pd.Index(frame.index[::-1])  # another donor order than the fit's
        self.var = pd.DataFrame({"chrom": "1", "pos": np.arange(frame.shape[1]) * 10}, index=frame.columns)
        self._values = frame.to_numpy(dtype=np.float64)[::-1]
        self.calls = 0

    def read(self, rows, cols):
        self.calls += 1
        return self._values[np.ix_(rows, cols)]


def test_custom_genotype_reader(fitted, geno):
    """Any object with ``donors``, ``var`` and ``read(rows, cols)`` is accepted as genotypes, with the same results."""
    from scverse_nullfit.io._genotypes import GenotypeReader

    reader = _ListReader(geno)
    assert isinstance(reader, GenotypeReader)
    expected = snf.tl.score_test(fitted, geno)
    got = snf.tl.score_test(fitted, reader, chunk_size=7)
    assert reader.calls == -(-geno.shape[1] // 7)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-10)
