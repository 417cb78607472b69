"""Conditional score test (snf.tl.score_test(condition=...)): exact against a dense cell-level P with the
conditioning variants added as covariates at the fitted tau and sigma2_e; bad conditioning input."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import scverse_nullfit as snf

from .conftest import COVARIATES, DONOR_COVARIATES, dense_score

STAT_COLUMNS = ["score", "score_var", "z", "pval", "beta", "se"]
VARIANT_COLUMNS = ["ref", "alt", "af", "ma_samples", "ma_count", "n_donors", "n_cells"]


@pytest.fixture
def geno(fitted):
    return fitted.uns["genotypes"].iloc[:, :30].copy()


def _dense_conditional(adata, genotypes: pd.DataFrame, cond: pd.DataFrame):
    """Score and variance from the dense N x N P whose design is X plus the conditioning variants in cells (Z C),
    at each gene's fitted tau and sigma2_e."""
    return dense_score(adata, genotypes, cond)


@pytest.mark.parametrize("k", [1, 3])
def test_matches_dense_projection_with_conditioning_covariates(fitted, geno, k):
    cond_ids = list(geno.columns[[4, 11, 20][:k]])
    res = snf.tl.score_test(fitted, geno, condition=cond_ids)
    assert list(res.columns) == ["gene", "variant", *VARIANT_COLUMNS, *STAT_COLUMNS]
    assert (fitted.varm["nullfit"]["tau"] == 0).any() and (fitted.varm["nullfit"]["tau"] > 0).any()
    oracle = _dense_conditional(fitted, geno, geno[cond_ids])
    for gene, (S, Var) in oracle.items():
        rows = res[res["gene"] == gene]
        free = ~rows["variant"].isin(cond_ids).to_numpy()
        assert rows.loc[~free, STAT_COLUMNS].isna().all().all()  # the conditioning variants themselves
        scale = np.abs(S[free]).max()
        np.testing.assert_allclose(rows["score"][free], S[free], rtol=1e-7, atol=1e-9 * scale)
        np.testing.assert_allclose(rows["score_var"][free], Var[free], rtol=1e-7)
        z = S[free] / np.sqrt(Var[free])
        np.testing.assert_allclose(rows["z"][free], z, rtol=1e-7, atol=1e-9 * np.abs(z).max())
        np.testing.assert_allclose(rows["pval"][free], 2 * stats.norm.sf(np.abs(z)), rtol=1e-6)


def test_dataframe_condition_equals_variant_ids(fitted, geno):
    by_id = snf.tl.score_test(fitted, geno, condition=[geno.columns[3], geno.columns[7]])
    frame = geno[[geno.columns[3], geno.columns[7]]].rename(columns=lambda c: f"c_{c}").sample(frac=1.0, random_state=1)
    by_frame = snf.tl.score_test(fitted, geno, condition=frame)
    pd.testing.assert_frame_equal(by_frame, by_id, check_exact=False, rtol=1e-9, atol=1e-12)
    # an empty condition is the plain test; conditioning on an unrelated variant changes little but something
    pd.testing.assert_frame_equal(snf.tl.score_test(fitted, geno, condition=[]), snf.tl.score_test(fitted, geno))


def test_conditioning_on_the_causal_variant_removes_its_signal():
    adata = snf.datasets.simulate(n_donors=120, cells_per_donor=6.0, n_genes=4, n_cis_variants=8, frac_null=0.0,
                                  h2_range=(0.3, 0.5), seed=5)  # fmt: skip
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    geno = adata.uns["genotypes"]
    gene = adata.var_names[0]
    res = snf.tl.score_test(adata, geno, genes=[gene])
    top = res.loc[res["pval"].idxmin(), "variant"]
    cond = snf.tl.score_test(adata, geno, genes=[gene], condition=[top])
    assert np.isnan(cond.loc[cond["variant"] == top, "pval"]).all()
    assert np.nanmin(cond["pval"]) > res["pval"].min()


def test_bad_conditioning(fitted, geno):
    with pytest.raises(KeyError, match="nope"):
        snf.tl.score_test(fitted, geno, condition=["nope"])
    with pytest.raises(ValueError, match="more than once"):
        snf.tl.score_test(fitted, geno, condition=[geno.columns[0], geno.columns[0]])
    mono = geno.copy()
    mono["mono"] = 1.0
    with pytest.raises(ValueError, match=r"monomorphic.*'mono'"):
        snf.tl.score_test(fitted, mono, condition=["mono", geno.columns[0]])
    dup = geno.copy()
    dup["twin"] = 2.0 - dup[geno.columns[2]]  # perfect LD with variant 2
    with pytest.raises(ValueError, match=r"collinear.*'twin'"):
        snf.tl.score_test(fitted, dup, condition=[geno.columns[2], "twin"])
    donors = pd.Index(fitted.uns["nullfit"]["donors"])
    sex = fitted.obs.groupby("donor_id", observed=True)["sex"].first().reindex(donors)
    like_sex = pd.DataFrame({"like_sex": 2.0 * (sex == "M").to_numpy(float)}, index=donors)
    with pytest.raises(ValueError, match=r"collinear.*'like_sex'"):
        snf.tl.score_test(fitted, geno, condition=like_sex)
    with pytest.raises(ValueError, match="D0003"):
        snf.tl.score_test(fitted, geno, condition=geno.iloc[:, :1].drop(index="D0003"))
    with pytest.raises(ValueError, match="condition must be"):
        snf.tl.score_test(fitted, geno, condition=3)
