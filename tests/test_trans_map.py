"""snf.tl.trans_map: equals score_test filtered by the threshold, chunking invariance, minima, storage, errors."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf

STAT_COLUMNS = ["score", "score_var", "z", "pval", "beta", "se"]
VARIANT_COLUMNS = ["ref", "alt", "af", "ma_samples", "ma_count", "n_donors", "n_cells"]


@pytest.fixture(scope="module")
def genotypes(fitted):
    geno = fitted.uns["genotypes"]
    variants = fitted.uns["variants"]
    g = ad.AnnData(X=geno.to_numpy(np.float64), obs=pd.DataFrame(index=geno.index.astype(str)))
    g.var_names = geno.columns.astype(str)
    g.var["chrom"] = variants.loc[g.var_names, "chrom"].astype(str).to_numpy()
    g.var["pos"] = variants.loc[g.var_names, "pos"].to_numpy(np.int64)
    g.X[:3, 5] = np.nan  # a few missing dosages
    g.X[:, 7] = 1.0  # a monomorphic variant
    return g


def test_equals_score_test_filtered(fitted, genotypes):
    full = snf.tl.score_test(fitted, genotypes)
    p = full["pval"].to_numpy()
    threshold = float(np.quantile(p[np.isfinite(p)], 0.05))
    out = snf.tl.trans_map(fitted, genotypes, pval_threshold=threshold, copy=True)
    got = snf.get.trans_df(out)
    expected = full[full["pval"] < threshold].reset_index(drop=True)
    assert len(got) == len(expected) > 10
    assert list(got.columns) == ["gene", "variant", "chrom", "pos", *VARIANT_COLUMNS, *STAT_COLUMNS]
    # the variant columns are those of score_test
    pd.testing.assert_frame_equal(got[VARIANT_COLUMNS], expected[VARIANT_COLUMNS], check_categorical=False)
    np.testing.assert_array_equal(got["gene"].astype(str), expected["gene"].astype(str))
    np.testing.assert_array_equal(got["variant"].astype(str), expected["variant"].astype(str))
    np.testing.assert_allclose(got[STAT_COLUMNS].to_numpy(), expected[STAT_COLUMNS].to_numpy(), rtol=1e-10)
    np.testing.assert_array_equal(got["pos"], genotypes.var.loc[got["variant"].astype(str), "pos"])
    # per-gene and per-variant minima
    wide = full.pivot(index="gene", columns="variant", values="pval").loc[fitted.var_names, genotypes.var_names]
    genes = out.varm["trans"]
    np.testing.assert_allclose(genes["min_pval"], wide.min(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(genes["min_variant"].astype(str), wide.idxmin(axis=1).astype(str))
    np.testing.assert_array_equal(genes["n_associations"], (wide < threshold).sum(axis=1))
    variants = out.uns["trans"]["variants"]
    assert list(variants.index) == list(genotypes.var_names)
    np.testing.assert_allclose(variants["min_pval"], wide.min(axis=0), rtol=1e-10)
    assert np.isnan(variants.loc[genotypes.var_names[7], "min_pval"])
    finite = variants["min_pval"].notna().to_numpy()
    np.testing.assert_array_equal(
        variants["min_gene"].astype(str)[finite], wide.loc[:, finite].idxmin(axis=0).astype(str)
    )
    np.testing.assert_array_equal(variants["n_associations"], (wide < threshold).sum(axis=0))
    assert out.uns["trans"]["params"]["n_associations"] == len(got)


def test_small_chunks_give_identical_results(fitted, genotypes, monkeypatch):
    expected = snf.tl.trans_map(fitted, genotypes, pval_threshold=0.01, copy=True)
    monkeypatch.setattr("scverse_nullfit.tl._trans_map.BLOCK_ELEMENTS", 200)  # gene blocks of one or two genes
    got = snf.tl.trans_map(fitted, genotypes, pval_threshold=0.01, chunk_size=7, copy=True)
    pd.testing.assert_frame_equal(snf.get.trans_df(got), snf.get.trans_df(expected), check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(got.varm["trans"], expected.varm["trans"], check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(
        got.uns["trans"]["variants"], expected.uns["trans"]["variants"], check_exact=False, rtol=1e-12
    )


def test_genes_subset_storage_and_errors(fitted, genotypes, tmp_path):
    sub = snf.tl.trans_map(fitted, genotypes, pval_threshold=0.05, genes=fitted.var_names[:3], copy=True)
    table = snf.get.trans_df(sub)
    assert set(table["gene"].astype(str)) <= set(fitted.var_names[:3])
    assert sub.varm["trans"]["min_pval"].iloc[3:].isna().all()
    assert (sub.varm["trans"]["n_associations"].iloc[3:] == 0).all()
    one = snf.get.trans_df(sub, genes=fitted.var_names[0])
    assert set(one["gene"].astype(str)) == {fitted.var_names[0]}
    path = tmp_path / "trans.h5ad"
    sub.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(snf.get.trans_df(back), table, check_categorical=False)
    # a DataFrame of genotypes, with variant metadata from variants=
    frame = fitted.uns["genotypes"].iloc[:, :20]
    plain = snf.tl.trans_map(fitted, frame, pval_threshold=1.0, copy=True)
    assert list(snf.get.trans_df(plain).columns) == ["gene", "variant", *VARIANT_COLUMNS, *STAT_COLUMNS]
    assert len(snf.get.trans_df(plain)) == snf.tl.score_test(fitted, frame)["pval"].notna().sum()
    with_meta = snf.tl.trans_map(fitted, frame, pval_threshold=1.0, variants=fitted.uns["variants"], copy=True)
    assert {"chrom", "pos"} <= set(snf.get.trans_df(with_meta).columns)
    assert "trans" not in fitted.uns
    with pytest.raises(ValueError, match="pval_threshold"):
        snf.tl.trans_map(fitted, genotypes, pval_threshold=0)
    with pytest.raises(ValueError, match="overwrite"):
        snf.tl.trans_map(fitted, genotypes, key_added="nullfit")
    with pytest.raises(ValueError, match="D0007"):
        snf.tl.trans_map(fitted, frame.drop(index="D0007"))
    with pytest.raises(KeyError, match="trans_map"):
        snf.get.trans_df(fitted)
    assert "trans" not in fitted.uns and "trans" not in fitted.varm
