"""Hand-offs: variant metadata in the step-2 tables, tensorQTL / coloc / SuSiE / mashr shapes, per-cell-type
results side by side, cellink's DonorData layout."""

import gzip
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf
from scverse_nullfit.get._export import TENSORQTL_GENE, TENSORQTL_NOMINAL, TENSORQTL_TRANS

from .conftest import COVARIATES, DONOR_COVARIATES


def _cellink_adata(fitted, n=None) -> ad.AnnData:
    """Genotypes in cellink's layout: donors x variants, var with chrom, pos, a0 (ref), a1 (counted)."""
    dosages = fitted.uns["genotypes"] if n is None else fitted.uns["genotypes"].iloc[:, :n]
    variants = fitted.uns["variants"].loc[dosages.columns]
    rng = np.random.default_rng(0)
    bases = np.array(list("ACGT"))
    a0 = rng.choice(bases, dosages.shape[1])
    a1 = np.array([rng.choice(bases[bases != b]) for b in a0])
    var = pd.DataFrame(
        {"chrom": variants["chrom"].to_numpy(), "pos": variants["pos"].to_numpy(), "a0": a0, "a1": a1, "maf": 0.2},
        index=pd.Index(dosages.columns.astype(str), name="snp_id"),
    )
    return ad.AnnData(X=dosages.to_numpy(np.float64), obs=pd.DataFrame(index=dosages.index.astype(str)), var=var)


@pytest.fixture(scope="module")
def mapped(fitted):
    adata = fitted.copy()
    snf.tl.cis_map(adata, _cellink_adata(adata))
    return adata


# ---------------------------------------------------------------------------------------------------------------
# variant metadata
# ---------------------------------------------------------------------------------------------------------------


def test_allele_counts_match_an_independent_count(fitted):
    g = fitted.uns["genotypes"].iloc[:, :12].astype(float).copy()
    g.iloc[[0, 3], 1] = np.nan
    res = snf.tl.score_test(fitted, g, genes=fitted.var_names[:2])
    donors = pd.Index(fitted.uns["nullfit"]["donors"])
    cells = fitted.obs["donor_id"].astype(str).value_counts().reindex(donors)
    sub = g.loc[donors]
    af = sub.mean() / 2
    minor_alt = af <= 0.5
    carriers = np.where(minor_alt, (sub > 0.5).sum(), (sub < 1.5).sum())
    minor = np.where(minor_alt, sub.sum(), 2 * sub.notna().sum() - sub.sum())
    expected = pd.DataFrame(
        {
            "af": af.to_numpy(),
            "ma_samples": carriers,
            "ma_count": np.rint(minor).astype(np.int64),
            "n_donors": sub.notna().sum().to_numpy(),
            "n_cells": [int(cells[sub[c].notna()].sum()) for c in sub.columns],
        },
        index=g.columns,
    )
    got = res[res["gene"] == fitted.var_names[0]].set_index(
        res.loc[res["gene"] == fitted.var_names[0], "variant"].astype(str)
    )
    np.testing.assert_allclose(got["af"], expected["af"], rtol=1e-12)
    for col in ("ma_samples", "ma_count", "n_donors", "n_cells"):
        np.testing.assert_array_equal(got[col].to_numpy(), expected[col].to_numpy(), err_msg=col)
    assert got.loc[g.columns[1], "n_donors"] == len(donors) - 2
    assert res["ref"].isna().all() and res["alt"].isna().all()  # a DataFrame names no alleles


def test_cellink_alleles_a1_is_alt_and_the_table_survives_h5ad(mapped, tmp_path):
    geno = _cellink_adata(mapped)
    table = snf.get.cis_df(mapped)
    names = table["variant"].astype(str)
    np.testing.assert_array_equal(table["alt"].astype(str), geno.var.loc[names, "a1"])
    np.testing.assert_array_equal(table["ref"].astype(str), geno.var.loc[names, "a0"])
    summary = snf.get.cis_genes_df(mapped, tested_only=True)
    np.testing.assert_array_equal(
        summary["top_alt"].astype(str), geno.var.loc[summary["top_variant"].astype(str), "a1"]
    )
    path = tmp_path / "mapped.h5ad"
    mapped.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(snf.get.cis_df(back), table, check_categorical=False)


def test_donordata_like_object_is_accepted(fitted):
    class DonorData:  # cellink's layout: G donors x variants, C cells
        def __init__(self, G, C):
            self.G, self.C = G, C

    G = _cellink_adata(fitted, n=30)
    direct = snf.tl.score_test(fitted, G)
    via = snf.tl.score_test(fitted, DonorData(G, fitted))
    pd.testing.assert_frame_equal(direct, via)
    got = snf.tl.cis_map(fitted, DonorData(G, fitted), copy=True)
    assert len(snf.get.cis_df(got)) > 0


# ---------------------------------------------------------------------------------------------------------------
# tensorQTL
# ---------------------------------------------------------------------------------------------------------------


def _dtypes_match(df: pd.DataFrame, spec: dict) -> None:
    assert list(df.columns[: len(spec)]) == list(spec)
    for name, dtype in spec.items():
        assert df[name].dtype == np.dtype(dtype), (name, df[name].dtype)
        if dtype is object:
            assert all(isinstance(x, str) for x in df[name])


def test_tensorqtl_nominal_gene_and_trans_shapes(mapped):
    nominal = snf.get.tensorqtl_df(mapped, kind="nominal")
    _dtypes_match(nominal, TENSORQTL_NOMINAL)
    assert list(nominal.columns) == [
        "phenotype_id", "variant_id", "start_distance", "af", "ma_samples", "ma_count", "pval_nominal", "slope",
        "slope_se",
    ]  # fmt: skip
    table = snf.get.cis_df(mapped)
    np.testing.assert_array_equal(nominal["pval_nominal"], table["pval"])
    np.testing.assert_allclose(nominal["slope"], table["beta"], rtol=1e-6)
    np.testing.assert_array_equal(nominal["start_distance"], table["distance"].astype(int))

    genes = snf.get.tensorqtl_df(mapped, kind="gene")
    _dtypes_match(genes, TENSORQTL_GENE)
    assert {"pval_acat", "top_pval_bonf"} <= set(genes.columns)
    summary = snf.get.cis_genes_df(mapped).loc[genes["phenotype_id"]]
    np.testing.assert_array_equal(genes["variant_id"], summary["top_variant"].astype(str))
    np.testing.assert_array_equal(genes["num_var"], summary["n_variants"])
    # qval joins when the per-gene table has it
    with_q = mapped.copy()
    with_q.varm["cis"] = with_q.varm["cis"].assign(qval=0.5)
    assert "qval" in snf.get.tensorqtl_df(with_q, kind="gene").columns

    res = snf.tl.score_test(mapped, mapped.uns["genotypes"].iloc[:, :4])
    trans = snf.get.tensorqtl_df(res, kind="trans")
    assert list(trans.columns) == ["variant_id", "phenotype_id", "pval", "b", "b_se", "af"]
    _dtypes_match(trans, TENSORQTL_TRANS)
    kept = mapped.copy()
    kept.uns["trans"] = res
    pd.testing.assert_frame_equal(snf.get.tensorqtl_df(kept, "trans", kind="trans"), trans)
    kept.uns["scan"] = {"associations": res, "variants": pd.DataFrame({"min_pval": [0.1]}), "params": {}}
    pd.testing.assert_frame_equal(snf.get.tensorqtl_df(kept, "scan", kind="trans"), trans)
    with pytest.raises(ValueError, match="kind"):
        snf.get.tensorqtl_df(mapped, kind="permutations")
    with pytest.raises(KeyError, match="trans"):
        snf.get.tensorqtl_df(mapped, "nothing", kind="trans")


def test_write_tensorqtl_files(mapped, tmp_path):
    pytest.importorskip("pyarrow")
    by_chrom = snf.get.tensorqtl_df(mapped, by_chrom=True)
    assert set(by_chrom) == set(mapped.var["chrom"].astype(str))
    genes = snf.get.tensorqtl_df(mapped, kind="gene")
    trans = snf.get.tensorqtl_df(snf.tl.score_test(mapped, mapped.uns["genotypes"].iloc[:, :3]), kind="trans")
    prefix = tmp_path / "out"
    paths = snf.io.write_tensorqtl(prefix, nominal=by_chrom, genes=genes, trans=trans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(f"out.cis_qtl_pairs.{c}.parquet" for c in by_chrom), "out.cis_qtl.txt.gz", "out.trans_qtl_pairs.parquet"]
    )
    assert len(paths) == len(by_chrom) + 2
    for chrom, df in by_chrom.items():
        back = pd.read_parquet(tmp_path / f"out.cis_qtl_pairs.{chrom}.parquet")
        pd.testing.assert_frame_equal(back, df)
    back = pd.read_csv(tmp_path / "out.cis_qtl.txt.gz", sep="\t", index_col=0)  # as tensorQTL users read it
    assert back.index.name == "phenotype_id" and list(back.index) == list(genes["phenotype_id"])
    with gzip.open(tmp_path / "out.cis_qtl.txt.gz", "rt") as fh:
        assert fh.readline().rstrip("\n").split("\t")[:3] == ["phenotype_id", "num_var", "variant_id"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.trans_qtl_pairs.parquet"), trans)

    with pytest.raises(FileExistsError, match="cis_qtl"):
        snf.io.write_tensorqtl(prefix, genes=genes, overwrite=False)
    with pytest.raises(ValueError, match="mapping"):
        snf.io.write_tensorqtl(tmp_path / "x", nominal=snf.get.tensorqtl_df(mapped))
    with pytest.raises(FileNotFoundError, match="nodir"):
        snf.io.write_tensorqtl(tmp_path / "nodir" / "x", genes=genes)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("x.*"))


# ---------------------------------------------------------------------------------------------------------------
# coloc and SuSiE
# ---------------------------------------------------------------------------------------------------------------


def check_coloc_dataset(d: dict) -> None:
    """The rules of coloc's check_dataset for a quantitative dataset given beta and varbeta."""
    for name in ("type", "snp", "beta", "varbeta"):
        assert name in d, name
    assert d["type"] == "quant"
    assert "sdY" in d or ("MAF" in d and "N" in d)
    n = len(d["snp"])
    for name in ("beta", "varbeta", "snp", "position", "MAF"):
        if name in d:
            assert np.ndim(d[name]) == 1 and len(d[name]) == n, name
    assert len(set(d["snp"])) == n
    assert all(isinstance(s, str) for s in d["snp"])
    for name in ("beta", "varbeta", "MAF", "position"):
        assert np.isfinite(np.asarray(d[name], dtype=float)).all(), name
    assert (np.asarray(d["varbeta"]) > 0).all()
    assert ((np.asarray(d["MAF"]) > 0) & (np.asarray(d["MAF"]) < 1)).all()
    assert np.isscalar(d["N"]) and d["N"] > 0 and np.isscalar(d["sdY"]) and d["sdY"] > 0
    if "LD" in d:
        LD = d["LD"]
        assert list(LD.index) == list(d["snp"]) == list(LD.columns)


def test_coloc_dataset_passes_check_dataset(mapped):
    gene = snf.get.cis_genes_df(mapped, tested_only=True).index[0]
    d = snf.get.coloc_dataset(mapped, gene, genotypes=_cellink_adata(mapped))
    check_coloc_dataset(d)
    table = snf.get.cis_df(mapped, genes=gene)
    table = table[np.isfinite(table["beta"])]
    np.testing.assert_array_equal(d["snp"], table["variant"].astype(str))
    np.testing.assert_allclose(d["varbeta"], table["se"] ** 2)
    fit = snf.get.nullfit_df(mapped).loc[gene]
    assert d["sdY"] == pytest.approx(np.sqrt(fit["sigma2_g"] + fit["sigma2_e"]))
    assert d["N"] == len(mapped.uns["nullfit"]["donors"])
    with pytest.raises(KeyError, match="nope"):
        snf.get.coloc_dataset(mapped, "nope")


def test_ld_matches_numpy_and_the_z_order(mapped):
    geno = _cellink_adata(mapped)
    gene = snf.get.cis_genes_df(mapped, tested_only=True).index[1]
    R, z = snf.get.ld(mapped, geno, gene=gene)
    assert list(R.index) == list(R.columns) == list(z.index)
    table = snf.get.cis_df(mapped, genes=gene)
    np.testing.assert_array_equal(z.index, table["variant"].astype(str)[np.isfinite(table["z"])])
    np.testing.assert_array_equal(z.to_numpy(), table["z"][np.isfinite(table["z"])].to_numpy())
    donors = list(mapped.uns["nullfit"]["donors"])
    expected = np.corrcoef(geno[donors, list(R.index)].X, rowvar=False)
    np.testing.assert_allclose(R.to_numpy(), expected, atol=1e-12)
    np.testing.assert_array_equal(R.to_numpy(), R.to_numpy().T)
    np.testing.assert_array_equal(np.diag(R), 1.0)
    # a chosen order is kept, and susie's inputs line up
    order = list(R.index[::-1])
    R2, z2 = snf.get.ld(mapped, geno, order, gene=gene)
    assert list(R2.index) == order == list(z2.index)
    R3, none = snf.get.ld(mapped, geno, order, key="nullfit")
    assert none is None
    pd.testing.assert_frame_equal(R3, R2)
    # missing dosages are mean-imputed among the fit's donors
    g = mapped.uns["genotypes"][order].astype(float).copy()
    g.loc[donors[:3], order[0]] = np.nan
    filled = g.copy()
    filled[order[0]] = filled[order[0]].fillna(g.loc[donors, order[0]].mean())
    np.testing.assert_allclose(snf.get.ld(mapped, g, order)[0], snf.get.ld(mapped, filled, order)[0], atol=1e-12)
    with pytest.raises(KeyError, match="not in the genotypes"):
        snf.get.ld(mapped, geno, ["nope"])
    mono = mapped.uns["genotypes"][order[:2]].assign(mono=1.0)
    with pytest.raises(ValueError, match="monomorphic"):
        snf.get.ld(mapped, mono, [*order[:2], "mono"], key="nullfit")


# ---------------------------------------------------------------------------------------------------------------
# cell types side by side
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def by_cell_type(small_adata):
    adata = small_adata.copy()
    adata.obs["cell_type"] = (
        adata.obs["cell_type"].map({"B": "B", "CD4T": "T", "CD8T": "T", "NK": "T"}).astype("category")
    )
    covs = ["age", "sex", "log_counts"]
    snf.tl.fit_null(adata, covariates=covs, donor_covariates=DONOR_COVARIATES)
    snf.tl.fit_null(adata, covariates=covs, donor_covariates=DONOR_COVARIATES, groupby="cell_type")
    snf.tl.cis_map(adata, adata.uns["genotypes"], variants=adata.uns["variants"], groupby="cell_type")
    snf.tl.cis_map(adata, adata.uns["genotypes"], variants=adata.uns["variants"])
    return adata


def test_two_cell_types_side_by_side(by_cell_type):
    adata = by_cell_type
    for group in ("B", "T"):
        assert f"nullfit_{group}" in adata.uns and f"cis_{group}" in adata.uns
        params = adata.uns[f"nullfit_{group}"]["params"]
        assert params["groupby"] == "cell_type" and params["group"] == group
        cells = adata.obs["cell_type"] == group
        assert int(np.sum(adata.uns[f"nullfit_{group}"]["cells_per_donor"])) == int(cells.sum())
        table = snf.get.cis_df(adata, f"cis_{group}")
        assert (table["cell_type"] == group).all()
        assert (snf.get.cis_genes_df(adata, f"cis_{group}")["cell_type"] == group).all()
    # the whole-data fit and map stay as they were
    assert "nullfit" in adata.uns and "cis" in adata.uns
    assert "cell_type" not in snf.get.cis_df(adata).columns


def test_group_fit_equals_a_fit_of_the_subset(by_cell_type, small_adata):
    sub = small_adata[small_adata.obs["cell_type"] != "B"].copy()
    snf.tl.fit_null(sub, covariates=["age", "sex", "log_counts"], donor_covariates=DONOR_COVARIATES)
    got = snf.get.nullfit_df(by_cell_type, "nullfit_T")
    np.testing.assert_allclose(got["tau"], snf.get.nullfit_df(sub)["tau"], rtol=1e-10, atol=1e-12)
    res = snf.tl.score_test(by_cell_type, by_cell_type.uns["genotypes"].iloc[:, :5], key="nullfit_T")
    ref = snf.tl.score_test(sub, sub.uns["genotypes"].iloc[:, :5])
    np.testing.assert_allclose(res["z"], ref["z"], rtol=1e-10, equal_nan=True)


def test_effect_matrices(by_cell_type):
    B, S = snf.get.effect_matrices(by_cell_type)
    assert list(B.columns) == ["B", "T"] == list(S.columns)
    assert B.index.names == ["gene", "variant"] and B.index.equals(S.index)
    assert np.isfinite(B.to_numpy()).all() and (S.to_numpy() > 0).all()
    t = snf.get.cis_df(by_cell_type, "cis_T").set_index(["gene", "variant"])
    t.index = t.index.set_levels([lv.astype(str) for lv in t.index.levels])
    np.testing.assert_allclose(B["T"], t.loc[B.index, "beta"])
    Bt, _St = snf.get.effect_matrices(by_cell_type, ["cis_B", "cis_T"], pairs="top")
    assert Bt.index.get_level_values("gene").is_unique and set(Bt.columns) == {"B", "T"}
    assert Bt.index.isin(B.index).all()
    Bm, _ = snf.get.effect_matrices(by_cell_type, {"bcells": "cis_B", "all": "cis"})
    assert list(Bm.columns) == ["bcells", "all"]


def test_groupby_errors_leave_adata_unchanged(small_adata):
    adata = small_adata.copy()
    with pytest.raises(KeyError, match="nope"):
        snf.tl.fit_null(adata, groupby="nope")
    with pytest.raises(KeyError, match="fit_null"):
        snf.tl.cis_map(adata, adata.uns["genotypes"], variants=adata.uns["variants"], groupby="cell_type")
    assert not any(k.startswith(("nullfit", "cis")) for k in adata.uns)
    assert len(adata.varm) == 0


def test_full_covariates_for_one_group(small_adata):
    """A categorical covariate constant within a group is dropped there (with a warning), not an error."""
    adata = small_adata[small_adata.obs["cell_type"].isin(["B", "NK"])].copy()
    with pytest.warns(UserWarning):
        snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, groupby="cell_type")
    assert {"nullfit_B", "nullfit_NK"} <= set(adata.uns)


def test_group_fits_are_checked_like_any_fit(by_cell_type):
    adata = by_cell_type.copy()
    record = adata.uns["nullfit_T"]["cells"]
    assert record["n_cells"] == adata.n_obs and record["n_group_cells"] == int((adata.obs["cell_type"] == "T").sum())
    geno = adata.uns["genotypes"].iloc[:, :3]
    with pytest.raises(ValueError, match="cells"):
        snf.tl.score_test(adata[:100].copy(), geno, key="nullfit_T")
    relabelled = adata.copy()
    relabelled.obs["cell_type"] = relabelled.obs["cell_type"].cat.reorder_categories(["T", "B"])
    snf.get.cis_df(relabelled, "cis_T")  # same cells per group: fine
    flipped = relabelled.obs["cell_type"].astype(str).to_numpy().copy()
    flipped[:5] = np.where(flipped[:5] == "T", "B", "T")
    relabelled.obs["cell_type"] = pd.Categorical(flipped)
    with pytest.raises(ValueError, match="cell_type"):
        snf.tl.score_test(relabelled, geno, key="nullfit_T")
    with pytest.raises(ValueError, match="cell_type"):
        snf.get.cis_df(relabelled, "cis_B")


def test_group_errors_name_the_group_and_keys_cannot_collide(small_adata):
    adata = small_adata.copy()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) < 5, "tiny", "rest"))
    adata.obs["x"] = np.where(np.arange(adata.n_obs) < 5, np.nan, 1.0) * np.arange(adata.n_obs)
    with pytest.raises(ValueError, match=r"'tiny'.*'x'|'x'.*'tiny'"):
        snf.tl.fit_null(adata, covariates=["x"], groupby="batch")
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "beta", "other"))
    with pytest.raises(ValueError, match="collide"):
        snf.tl.fit_null(adata, groupby="batch")
    assert not any(k.startswith("nullfit") for k in adata.uns) and len(adata.varm) == 0


def test_command_line_export_tensorqtl(mapped, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from scverse_nullfit._cli import main

    kept = mapped.copy()
    kept.uns["trans"] = snf.tl.score_test(kept, kept.uns["genotypes"].iloc[:, :3])
    path = tmp_path / "mapped.h5ad"
    kept.write_h5ad(path)
    prefix = tmp_path / "study"
    assert main(["export-tensorqtl", str(path), str(prefix), "--trans-key", "trans"]) == 0
    out = capsys.readouterr().out.split()
    chroms = sorted(set(kept.var["chrom"].astype(str)))
    expected = [
        *(f"study.cis_qtl_pairs.{c}.parquet" for c in chroms),
        "study.cis_qtl.txt.gz",
        "study.trans_qtl_pairs.parquet",
    ]
    assert sorted(Path(p).name for p in out) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("study")) == sorted(expected)
    genes = pd.read_csv(f"{prefix}.cis_qtl.txt.gz", sep="\t")
    assert list(genes.columns[:3]) == ["phenotype_id", "num_var", "variant_id"]
    # an existing output needs --overwrite; the error is one line and nothing is half-written
    assert main(["export-tensorqtl", str(path), str(prefix)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["export-tensorqtl", str(path), str(tmp_path / "nodir" / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export-tensorqtl", str(path), str(tmp_path / "y"), "--key", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp"))


def test_cell_type_results_survive_h5ad(by_cell_type, tmp_path):
    path = tmp_path / "by_cell_type.h5ad"
    by_cell_type.write_h5ad(path)
    back = ad.read_h5ad(path)
    B, S = snf.get.effect_matrices(back)
    B0, S0 = snf.get.effect_matrices(by_cell_type)
    pd.testing.assert_frame_equal(B, B0)
    pd.testing.assert_frame_equal(S, S0)
    res = snf.tl.score_test(back, back.uns["genotypes"].iloc[:, :3], key="nullfit_B")
    assert res["n_cells"].max() == int((back.obs["cell_type"] == "B").sum())


def test_group_fit_of_backed_and_sparse_input(by_cell_type, small_adata, tmp_path):
    from scipy import sparse

    adata = small_adata.copy()
    adata.obs["cell_type"] = by_cell_type.obs["cell_type"].to_numpy()
    adata.X = sparse.csr_matrix(adata.X)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    covs = ["age", "sex", "log_counts"]
    snf.tl.fit_null(backed, covariates=covs, donor_covariates=DONOR_COVARIATES, groupby="cell_type")
    for group in ("B", "T"):
        np.testing.assert_allclose(
            snf.get.nullfit_df(backed, f"nullfit_{group}")["tau"],
            snf.get.nullfit_df(by_cell_type, f"nullfit_{group}")["tau"],
            rtol=1e-8,
            atol=1e-10,
        )
    backed.file.close()


def test_trans_map_results_to_tensorqtl(fitted):
    out = snf.tl.trans_map(fitted, _cellink_adata(fitted, n=40), pval_threshold=0.2, copy=True)
    trans = snf.get.tensorqtl_df(out, "trans", kind="trans")
    assert list(trans.columns) == list(TENSORQTL_TRANS)
    kept = snf.get.trans_df(out)
    assert len(trans) == len(kept) > 0
    np.testing.assert_allclose(trans["af"], kept["af"], rtol=1e-6)
    assert np.isfinite(trans["af"]).all()


def test_independent_signals_in_tensorqtl_shape(tmp_path):
    pytest.importorskip("pyarrow")
    from scverse_nullfit.get._export import TENSORQTL_INDEPENDENT

    adata = snf.datasets.simulate(n_donors=80, cells_per_donor=6.0, n_genes=6, frac_eqtl=0.5, eqtl_effect=1.5, seed=3)
    snf.tl.fit_null(adata, covariates=["age", "sex"], donor_covariates=["age", "sex"])
    snf.tl.cis_map(adata, adata.uns["genotypes"], variants=adata.uns["variants"], independent=True)
    signals = snf.get.cis_independent_df(adata)
    assert len(signals) > 0
    out = snf.get.tensorqtl_df(adata, kind="independent")
    _dtypes_match(out, TENSORQTL_INDEPENDENT)
    assert list(out.columns) == [*TENSORQTL_INDEPENDENT, "pval_gene"]
    np.testing.assert_array_equal(out["rank"], signals["rank"])
    np.testing.assert_array_equal(out["variant_id"], signals["variant"].astype(str))
    paths = snf.io.write_tensorqtl(tmp_path / "s", genes=snf.get.tensorqtl_df(adata, kind="gene"), independent=out)
    assert [p.name for p in paths] == ["s.cis_qtl.txt.gz", "s.cis_independent_qtl.txt.gz"]
    back = pd.read_csv(paths[1], sep="\t", index_col=0)
    assert back.index.name == "phenotype_id" and len(back) == len(out)


def test_ld_from_a_file_reads_only_the_fits_donors(mapped, tmp_path, monkeypatch):
    """From a PGEN with more samples than the fit's donors, ``get.ld`` asks the reader for the fit's donors only and
    gives the same LD as from the DataFrame."""
    pytest.importorskip("pgenlib")
    from scverse_nullfit.io import _genotypes

    from .test_genotype_formats import write_pgen

    gene = snf.get.cis_genes_df(mapped, tested_only=True).index[1]
    order = list(snf.get.ld(mapped, mapped.uns["genotypes"], gene=gene)[0].index)
    df = mapped.uns["genotypes"][order].astype(float)
    extra = pd.DataFrame(np.ones((3, len(order))), index=["X1", "X2", "X3"], columns=order)
    wide = pd.concat([df, extra])
    meta = pd.DataFrame({"chrom": "1", "pos": np.arange(1, len(order) + 1) * 10, "id": order, "ref": "A", "alt": "G"})
    prefix = write_pgen(tmp_path / "g", wide, meta)
    asked = []
    opener = _genotypes.open_genotypes
    monkeypatch.setattr(_genotypes, "open_genotypes", lambda path, **kw: asked.append(kw) or opener(path, **kw))
    R, _ = snf.get.ld(mapped, f"{prefix}.pgen", order)
    assert asked == [{"samples": list(mapped.uns["nullfit"]["donors"])}]
    np.testing.assert_allclose(R.to_numpy(), snf.get.ld(mapped, df, order)[0].to_numpy(), atol=1e-12)
