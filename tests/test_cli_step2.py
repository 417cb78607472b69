"""The ``score-test`` and ``cis-map`` commands: same tables as the API, TSV and Parquet, clean errors, atomic writes."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf
from scverse_nullfit._cli import main

from .conftest import COVARIATES, DONOR_COVARIATES
from .test_cli import digest, leftovers, run
from .test_genotype_formats import bgzip_index, write_pgen, write_vcf

STATS = ["score", "score_var", "z", "pval", "beta", "se"]


@pytest.fixture(scope="module")
def step2(tmp_path_factory):
    """A fit-null output on disk and its donors' genotypes as .vcf.gz (indexed), .vcf (not), .pgen and .h5ad."""
    d = tmp_path_factory.mktemp("step2cli")
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=8, seed=1, n_cis_variants=10, frac_eqtl=0.5)
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    meta = adata.uns["variants"].copy()
    meta["chrom"] = meta["chrom"].astype(str)
    meta = meta.sort_values(["chrom", "pos"], kind="stable").assign(ref="A", alt="G")
    meta["id"] = meta.index
    df = adata.uns["genotypes"][meta.index].astype(np.float64)
    del adata.uns["genotypes"], adata.uns["variants"]
    fitted = d / "fitted.h5ad"
    adata.write_h5ad(fitted)
    files = {"fitted": fitted, "adata": adata, "df": df, "meta": meta}
    files["vcf"] = write_vcf(d / "g.vcf", df, meta)
    files["vcf.gz"] = bgzip_index(files["vcf"])
    files["pgen"] = write_pgen(d / "g", df, meta).parent / "g.pgen"
    import anndata as ad

    ad.AnnData(df, var=meta[["chrom", "pos"]]).write_h5ad(d / "geno.h5ad")
    files["h5ad"] = d / "geno.h5ad"
    meta[["chrom", "pos"]].to_csv(d / "positions.tsv", sep="\t")
    files["positions"] = d / "positions.tsv"
    return files


def _read(path) -> pd.DataFrame:
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path, sep="\t")


@pytest.mark.parametrize(("fmt", "suffix"), [("vcf.gz", ".tsv"), ("pgen", ".parquet"), ("h5ad", ".tsv.gz")])
def test_score_test_command_equals_api(step2, tmp_path, capsys, fmt, suffix):
    before = digest(step2["fitted"])
    out = tmp_path / f"res{suffix}"
    rc, stdout, err = run(
        capsys, "score-test", step2["fitted"], step2[fmt], "-o", out, "--genes", "gene00001,gene00003"
    )
    assert rc == 0, err
    assert "score-test" in stdout and str(out) in stdout
    got = _read(out)
    want = snf.tl.score_test(step2["adata"], step2["df"], genes=["gene00001", "gene00003"])
    assert list(got.columns) == list(want.columns)
    assert list(got["gene"].astype(str)) == list(want["gene"].astype(str))
    assert list(got["variant"].astype(str)) == list(want["variant"].astype(str))
    np.testing.assert_allclose(got[STATS].to_numpy(float), want[STATS].to_numpy(float), rtol=1e-9)
    assert digest(step2["fitted"]) == before and leftovers(tmp_path) == []


def test_cis_map_command_equals_api(step2, tmp_path, capsys):
    out, genes_out = tmp_path / "cis.tsv", tmp_path / "genes.parquet"
    argv = ["cis-map", step2["fitted"], step2["vcf.gz"], "-o", out, "--genes-output", genes_out, "--window", 300000]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "genes tested" in stdout and str(genes_out) in stdout
    want = snf.tl.cis_map(step2["adata"], step2["df"], variants=step2["meta"], window=300_000, copy=True)
    got, b = _read(out), snf.get.cis_df(want)
    assert list(got["variant"].astype(str)) == list(b["variant"].astype(str)) and len(got) > 0
    np.testing.assert_array_equal(got["pos"], b["pos"])
    np.testing.assert_allclose(got[STATS].to_numpy(float), b[STATS].to_numpy(float), rtol=1e-9)
    summary = _read(genes_out)
    expected = snf.get.cis_genes_df(want)
    assert list(summary["gene"]) == list(expected.index)
    np.testing.assert_allclose(summary["pval_acat"], expected["pval_acat"], rtol=1e-9)
    # the same from PGEN and from a genotype .h5ad with positions from a TSV; --genes, --quiet
    for geno, extra in ((step2["pgen"], []), (step2["h5ad"], ["--variant-positions", step2["positions"]])):
        out2 = tmp_path / "cis2.tsv"
        rc, stdout, err = run(capsys, "cis-map", step2["fitted"], geno, "-o", out2, "--window", 300000,
                              "--overwrite", "-q", *extra)  # fmt: skip
        assert rc == 0 and stdout == "", err
        np.testing.assert_allclose(_read(out2)[STATS].to_numpy(float), got[STATS].to_numpy(float), rtol=1e-9)
    assert leftovers(tmp_path) == []


def test_cis_map_fdr_and_independent_signals(step2, tmp_path, capsys):
    out, genes_out, signals = tmp_path / "c.tsv", tmp_path / "g.tsv", tmp_path / "s.tsv"
    argv = ["cis-map", step2["fitted"], step2["pgen"], "-o", out, "--genes-output", genes_out,
            "--independent-output", signals, "--fdr", 0.2, "--fdr-method", "bh"]  # fmt: skip
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "eGenes" in stdout and "FDR 0.2" in stdout
    want = snf.tl.cis_map(step2["adata"], step2["df"], variants=step2["meta"], fdr=0.2, fdr_method="bh",
                          independent=True, copy=True)  # fmt: skip
    summary = _read(genes_out)
    np.testing.assert_allclose(summary["qval"], snf.get.cis_genes_df(want)["qval"], rtol=1e-9)
    assert list(summary["is_egene"]) == list(snf.get.cis_genes_df(want)["is_egene"])
    got, expected = _read(signals), snf.get.cis_independent_df(want)
    assert len(got) > 0 and list(got["variant"].astype(str)) == list(expected["variant"].astype(str))
    np.testing.assert_allclose(got["pval"], expected["pval"], rtol=1e-9)
    rc, _, err = run(capsys, "cis-map", step2["fitted"], step2["pgen"], "-o", out, "--overwrite", "--fdr-method", "x")
    assert rc == 2 and "--fdr-method" in err


def test_score_test_condition(step2, tmp_path, capsys):
    out = tmp_path / "c.tsv"
    cond = list(step2["meta"].index[:2])
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["vcf.gz"], "-o", out, "--condition", ",".join(cond),
                     "--genes", "gene00001")  # fmt: skip
    assert rc == 0, err
    want = snf.tl.score_test(step2["adata"], step2["df"], genes=["gene00001"], condition=cond)
    np.testing.assert_allclose(_read(out)[STATS].to_numpy(float), want[STATS].to_numpy(float), rtol=1e-9)
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["vcf.gz"], "-o", out, "--overwrite",
                     "--condition", "novariant")  # fmt: skip
    assert rc == 2 and "novariant" in err.strip().splitlines()[-1]


def test_trans_map_command_equals_api(step2, tmp_path, capsys):
    out, genes_out, variants_out = tmp_path / "t.tsv", tmp_path / "tg.tsv", tmp_path / "tv.parquet"
    argv = ["trans-map", step2["fitted"], step2["pgen"], "-o", out, "--pval-threshold", 0.01,
            "--genes-output", genes_out, "--variants-output", variants_out]  # fmt: skip
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "trans-map" in stdout and "kept" in stdout
    want = snf.tl.trans_map(step2["adata"], step2["df"], variants=step2["meta"], pval_threshold=0.01, copy=True)
    got, b = _read(out), snf.get.trans_df(want)
    assert len(got) == len(b) > 0
    assert list(got["variant"].astype(str)) == list(b["variant"].astype(str))
    np.testing.assert_allclose(got[STATS].to_numpy(float), b[STATS].to_numpy(float), rtol=1e-9)
    per_gene = _read(genes_out)
    assert list(per_gene["gene"]) == list(step2["adata"].var_names)
    np.testing.assert_allclose(per_gene["min_pval"], want.varm["trans"]["min_pval"], rtol=1e-9)
    per_variant = _read(variants_out)
    assert list(per_variant["variant"]) == list(step2["meta"].index)
    assert leftovers(tmp_path) == []
    for extra, culprit in ((["--pval-threshold", 2], "pval_threshold"), (["--genes-output", out], "different files")):
        rc, _, err = run(capsys, "trans-map", step2["fitted"], step2["pgen"], "-o", out, "--overwrite", *extra)
        assert rc == 2 and culprit in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--genes", "nogene"], "nogene"),
        (["--key", "other"], "'other'"),
        (["--chunk-size", "0"], "chunk_size"),
        (["--n-threads", "-1"], "n_threads"),
        (["--window", "-5"], "window"),
        (["--chrom-key", "chromosome"], "'chromosome'"),
        (["--variant-pos-key", "bp"], "'bp'"),
        (["--variant-positions", "{tmp}/none.tsv"], "none.tsv"),
        (["--genes-output", "{tmp}/g.csv"], "g.csv"),
        (["--genes-output", "{tmp}/o.tsv"], "different files"),
    ],
)
def test_cis_map_bad_options(step2, tmp_path, capsys, extra, culprit):
    out = tmp_path / "o.tsv"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    rc, _, err = run(capsys, "cis-map", step2["fitted"], step2["vcf.gz"], "-o", out, *extra)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and culprit in last and last.startswith("scverse-nullfit: error: ") and "Traceback" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_bad_files_fail_cleanly(step2, tmp_path, capsys):
    out = tmp_path / "o.tsv"
    fitted, vcf = step2["fitted"], step2["vcf.gz"]
    (tmp_path / "text.h5ad").write_text("not hdf5")
    (tmp_path / "g.txt").write_text("x")
    import anndata as ad

    ad.AnnData(step2["df"]).write_h5ad(tmp_path / "bare.h5ad")  # no variant positions
    other = step2["df"].rename(index=lambda d: f"X{d}")
    strangers = write_pgen(tmp_path / "strangers", other, step2["meta"]).parent / "strangers.pgen"
    cases = [
        (("score-test", tmp_path / "nope.h5ad", vcf, "-o", out), "nope.h5ad"),
        (("score-test", tmp_path / "text.h5ad", vcf, "-o", out), "text.h5ad"),
        (("score-test", fitted, tmp_path / "nope.vcf.gz", "-o", out), "nope.vcf.gz"),
        (("score-test", fitted, tmp_path / "nope", "-o", out), "nope"),
        (("score-test", fitted, tmp_path / "g.txt", "-o", out), "cannot tell the format"),
        (("score-test", fitted, strangers, "-o", out), "no donor in common"),
        (("score-test", fitted, vcf, "-o", tmp_path / "o.csv"), "o.csv"),
        (("score-test", fitted, vcf, "-o", tmp_path / "nodir" / "o.tsv"), "nodir"),
        (
            (
                "cis-map",
                fitted,
                vcf,
                "-o",
                step2["positions"],
                "--variant-positions",
                step2["positions"],
                "--overwrite",
            ),
            "is an input file",
        ),
        (("cis-map", fitted, step2["vcf"], "-o", out), "tabix -p vcf g.vcf.gz"),
        (("cis-map", fitted, tmp_path / "bare.h5ad", "-o", out), "'chrom'"),
    ]
    for argv, culprit in cases:
        rc, _, err = run(capsys, *argv)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert rc == 2, (argv, err)
        assert culprit in last and last.startswith("scverse-nullfit: error: ") and "Traceback" not in err, err
        assert not out.exists() and leftovers(tmp_path) == [], argv


def test_existing_output_kept_and_failed_write_leaves_nothing(step2, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.tsv"
    out.write_text("precious")
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["pgen"], "-o", out)
    assert rc == 2 and "--overwrite" in err and out.read_text() == "precious"

    def broken(self, path, *args, **kwargs):
        Path(path).write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    rc, _, err = run(capsys, "cis-map", step2["fitted"], step2["pgen"], "-o", out, "--overwrite",
                     "--genes-output", tmp_path / "g.parquet")  # fmt: skip
    assert rc == 2 and "disk full" in err
    assert out.read_text() == "precious" and not (tmp_path / "g.parquet").exists() and leftovers(tmp_path) == []


def test_score_test_refuses_huge_tables(step2, tmp_path, capsys):
    out = tmp_path / "o.tsv"
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["vcf.gz"], "-o", out, "--max-tests", 100)
    assert rc == 2 and "--max-tests 100" in err and "8 genes x 80 variants = 640 rows" in err and not out.exists()
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["vcf.gz"], "-o", out, "--max-tests", 100,
                     "--genes", "gene00001")  # fmt: skip
    assert rc == 0, err


def test_parquet_without_pyarrow(step2, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["pgen"], "-o", tmp_path / "o.parquet")
    assert rc == 2 and "pip install 'scverse-nullfit[parquet]'" in err


def test_step2_usage(capsys):
    for command in ("score-test", "cis-map", "trans-map"):
        rc, stdout, _ = run(capsys, command, "--help")
        assert rc == 0 and "GENOTYPES" in stdout and ".pgen" in stdout
    assert main(["cis-map"]) == 2


def test_cis_map_command_writes_tensorqtl_files(step2, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    out, prefix = tmp_path / "cis.tsv", tmp_path / "study"
    argv = ["cis-map", step2["fitted"], step2["vcf.gz"], "-o", out, "--window", 300000, "--tensorqtl", prefix]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "study.cis_qtl.txt.gz" in stdout
    want = snf.tl.cis_map(step2["adata"], step2["df"], variants=step2["meta"], window=300_000, copy=True)
    by_chrom = snf.get.tensorqtl_df(want, kind="nominal", by_chrom=True)
    for chrom, df in by_chrom.items():
        got = pd.read_parquet(tmp_path / f"study.cis_qtl_pairs.{chrom}.parquet")
        assert list(got.columns) == list(df.columns) and list(got.dtypes) == list(df.dtypes)
        np.testing.assert_array_equal(got["variant_id"], df["variant_id"])
        np.testing.assert_allclose(got["pval_nominal"], df["pval_nominal"], rtol=1e-9)
    genes = pd.read_csv(tmp_path / "study.cis_qtl.txt.gz", sep="\t", index_col=0)
    assert genes.index.name == "phenotype_id"
    assert list(genes.index) == list(snf.get.tensorqtl_df(want, kind="gene")["phenotype_id"])
    # the VCF's ALT is the counted allele
    table = _read(out)
    assert set(table["alt"]) == {"G"} and set(table["ref"]) == {"A"}
    # an existing tensorQTL file is kept without --overwrite, and nothing else is written
    out2 = tmp_path / "cis2.tsv"
    rc, _, err = run(capsys, *argv[:3], "-o", out2, "--window", 300000, "--tensorqtl", prefix)
    assert rc == 2 and "already exists" in err and not out2.exists()
    rc, _, err = run(capsys, *argv[:3], "-o", out2, "--tensorqtl", tmp_path / "nodir" / "x")
    assert rc == 2 and "nodir" in err
    assert leftovers(tmp_path) == []


def test_trans_map_command_writes_tensorqtl_pairs(step2, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    out, prefix = tmp_path / "t.tsv", tmp_path / "study"
    argv = ["trans-map", step2["fitted"], step2["pgen"], "-o", out, "--pval-threshold", 0.05, "--tensorqtl", prefix]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    got = pd.read_parquet(tmp_path / "study.trans_qtl_pairs.parquet")
    assert list(got.columns) == ["variant_id", "phenotype_id", "pval", "b", "b_se", "af"]
    table = _read(out)
    np.testing.assert_array_equal(got["variant_id"], table["variant"].astype(str))
    np.testing.assert_allclose(got["af"], table["af"], rtol=1e-6)
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "already exists" in err
    assert leftovers(tmp_path) == []


def test_cis_map_command_tensorqtl_with_independent_signals(step2, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    prefix = tmp_path / "ind"
    rc, _, err = run(capsys, "cis-map", step2["fitted"], step2["pgen"], "-o", tmp_path / "c.tsv", "--window", 300000,
                     "--independent-output", tmp_path / "sig.tsv", "--tensorqtl", prefix, "--fdr", 0.5)  # fmt: skip
    assert rc == 0, err
    got = pd.read_csv(tmp_path / "ind.cis_independent_qtl.txt.gz", sep="\t")
    assert list(got.columns[:3]) == ["phenotype_id", "variant_id", "start_distance"] and "rank" in got.columns
    assert len(got) == len(_read(tmp_path / "sig.tsv"))


def test_score_test_on_a_count_fit_spa_and_no_spa(step2, tmp_path, capsys):
    """A count fit's score-test gives saddlepoint p-values where |z| > 2 by default and normal ones with --no-spa."""
    from scipy import stats

    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=6, seed=3)
    for k in ("genotypes", "variants"):
        adata.uns.pop(k, None)
    snf.tl.fit_null(adata, family="poisson", layer="counts", offset="log_counts", donor_covariates=["age", "sex"])
    fitted = tmp_path / "counts.h5ad"
    adata.write_h5ad(fitted)
    tables = {}
    for flag in ([], ["--no-spa"]):
        out = tmp_path / f"res{len(flag)}.tsv"
        rc, _, err = run(capsys, "score-test", fitted, step2["h5ad"], "-o", out, *flag)
        assert rc == 0, err
        tables[bool(flag)] = _read(out)
    spa, normal = tables[False], tables[True]
    np.testing.assert_allclose(spa["z"], normal["z"], rtol=1e-12)
    np.testing.assert_allclose(normal["pval"], 2 * stats.norm.sf(np.abs(normal["z"])), rtol=1e-9)
    small = np.abs(spa["z"]) <= 2
    np.testing.assert_allclose(spa["pval"][small], normal["pval"][small], rtol=1e-12)
    want = snf.tl.score_test(adata, step2["df"], spa=False)
    np.testing.assert_allclose(normal["pval"], want["pval"], rtol=1e-9)
