"""score_test and cis_map on genotype files (VCF/BCF, PGEN, BGEN, PLINK 1): the same results as the DataFrame path."""

import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf
from scverse_nullfit.io._vcf import VcfGenotypes

from .test_genotype_formats import bgzip_index, to_bcf, write_bgen, write_pgen, write_vcf

STATS = ["score", "score_var", "z", "pval", "beta", "se"]


@pytest.fixture(scope="module")
def files(fitted, tmp_path_factory):
    """The simulated genotypes (sorted by position, a few fractional and missing dosages, extra donors, donors in
    another order) written in every format; and the DataFrame they hold."""
    d = tmp_path_factory.mktemp("step2")
    meta = fitted.uns["variants"].copy()
    meta["chrom"] = meta["chrom"].astype(str)
    meta = meta.sort_values(["chrom", "pos"], kind="stable")
    df = fitted.uns["genotypes"][meta.index].astype(np.float64)
    rng = np.random.default_rng(3)
    frac = rng.random(df.shape) < 0.2
    df = df.mask(frac, np.clip(df + rng.choice([-0.25, 0.25], size=df.shape), 0, 2))
    df = df.mask(rng.random(df.shape) < 0.03)
    df.loc["EXTRA1"] = 1.0  # a donor the fit does not have
    df = df.iloc[rng.permutation(len(df))]
    meta = meta.assign(ref="A", alt="G", id=meta.index)
    out = {"df": df, "meta": meta}
    vcf = write_vcf(d / "g.vcf", df, meta, chrom_prefix="chr")
    out["vcf"] = vcf
    out["vcf.gz"] = bgzip_index(vcf)
    out["bcf"] = to_bcf(out["vcf.gz"], d / "g.bcf")
    out["pgen"] = write_pgen(d / "g", df, meta).parent / "g.pgen"
    out["bgen_df"] = write_bgen(d / "g.bgen", df, meta, bits=16)
    out["bgen"] = d / "g.bgen"
    return out


def _expected(fmt, files):
    if fmt == "bgen":
        return files["bgen_df"], 2e-3
    return files["df"], 1e-10 if fmt != "pgen" else 1e-3


@pytest.mark.parametrize("fmt", ["vcf", "vcf.gz", "bcf", "pgen", "bgen"])
def test_score_test_file_equals_dataframe(fitted, files, fmt):
    df, rtol = _expected(fmt, files)
    genes = list(fitted.var_names[:3])
    got = snf.tl.score_test(fitted, files[fmt], genes=genes)
    want = snf.tl.score_test(fitted, df, genes=genes)
    assert list(got["gene"]) == list(want["gene"])
    assert list(got["variant"].astype(str)) == list(want["variant"].astype(str))
    np.testing.assert_allclose(got[STATS].to_numpy(), want[STATS].to_numpy(), rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("fmt", ["vcf.gz", "bcf", "pgen", "bgen"])
def test_cis_map_file_equals_dataframe(fitted, files, fmt):
    df, rtol = _expected(fmt, files)
    got = snf.tl.cis_map(fitted, files[fmt], window=500_000, copy=True)
    want = snf.tl.cis_map(fitted, df, variants=files["meta"], window=500_000, copy=True)
    a, b = snf.get.cis_df(got), snf.get.cis_df(want)
    assert len(a) == len(b) > 0
    assert list(a["variant"].astype(str)) == list(b["variant"].astype(str))
    np.testing.assert_array_equal(a["pos"], b["pos"])
    np.testing.assert_allclose(a[STATS].to_numpy(), b[STATS].to_numpy(), rtol=rtol, atol=rtol * 1e-3)
    ga, gb = snf.get.cis_genes_df(got), snf.get.cis_genes_df(want)
    np.testing.assert_allclose(ga["pval_acat"], gb["pval_acat"], rtol=rtol)


def test_cis_map_reads_only_the_windows_of_an_indexed_vcf(fitted, files, monkeypatch):
    queries = []
    original = VcfGenotypes._region_query

    def spy(self, contig, start, end, handle=None):
        queries.append((contig, start, end))
        return original(self, contig, start, end, handle)

    monkeypatch.setattr(VcfGenotypes, "_region_query", spy)
    window = 100_000
    genes = list(fitted.var_names[:2])
    snf.tl.cis_map(fitted, files["vcf.gz"], window=window, genes=genes, copy=True)
    assert queries
    g = fitted.var.loc[genes]
    for contig, start, end in queries:
        on = g[("chr" + g["chrom"].astype(str)) == contig]
        assert len(on), contig
        assert ((on["start"] - window <= start) & (end <= on["start"] + window)).any(), (contig, start, end)


def test_cis_map_unindexed_vcf_says_how_to_index(fitted, files):
    with pytest.raises(ValueError, match=r"g\.vcf.*need an index.*bgzip g\.vcf && tabix -p vcf g\.vcf\.gz"):
        snf.tl.cis_map(fitted, files["vcf"], copy=True)


def test_genotype_files_without_common_donors_or_contigs(fitted, files, tmp_path):
    df, meta = files["df"], files["meta"]
    other = df.rename(index=lambda d: f"X{d}")
    path = write_pgen(tmp_path / "other", other, meta).parent / "other.pgen"
    with pytest.raises(ValueError, match=r"other\.pgen.*no donor in common"):
        snf.tl.score_test(fitted, path)
    renamed = meta.assign(chrom="NC_000001")
    path = write_pgen(tmp_path / "contigs", df, renamed).parent / "contigs.pgen"
    with pytest.raises(ValueError, match=r"contigs\.pgen.*chromosomes of the genes.*NC_000001"):
        snf.tl.cis_map(fitted, path, copy=True)
    # missing donors of the fit are named
    path = write_pgen(tmp_path / "few", df.drop(index=["D0003"]), meta).parent / "few.pgen"
    with pytest.raises(ValueError, match=r"D0003"):
        snf.tl.score_test(fitted, path)


def test_dataframe_out_of_range_is_left_to_the_caller(fitted, files):
    """Only files are checked for dosages outside 0..2 (a DataFrame may hold standardised genotypes)."""
    df = files["df"] * 3.0
    assert len(snf.tl.score_test(fitted, df, genes=list(fitted.var_names[:1])))


def test_vcf_regions_cover_only_tested_genes_and_bed_files_work(fitted, files, tmp_path):
    """A cis map of one gene reads only its window; a PLINK 1 .bed of the hard calls gives the DataFrame's results."""
    bed_reader = pytest.importorskip("bed_reader")
    df, meta = files["df"], files["meta"]
    hard = df.round()
    bed_reader.to_bed(
        tmp_path / "h.bed",
        hard.to_numpy(),
        properties={"iid": list(hard.index), "sid": list(hard.columns), "chromosome": list(meta["chrom"]),
                    "bp_position": list(meta["pos"]), "allele_1": ["G"] * len(meta), "allele_2": ["A"] * len(meta)},
    )  # fmt: skip
    got = snf.tl.cis_map(fitted, tmp_path / "h.bed", window=300_000, copy=True)
    want = snf.tl.cis_map(fitted, hard, variants=meta, window=300_000, copy=True)
    a, b = snf.get.cis_df(got), snf.get.cis_df(want)
    assert list(a["variant"].astype(str)) == list(b["variant"].astype(str))
    np.testing.assert_allclose(a[STATS].to_numpy(), b[STATS].to_numpy(), rtol=1e-10)
    one = snf.tl.cis_map(fitted, files["vcf.gz"], window=300_000, genes=[fitted.var_names[0]], copy=True)
    assert set(snf.get.cis_df(one)["gene"].astype(str)) == {fitted.var_names[0]}
    assert pd.Series(snf.get.cis_df(one)["variant"].astype(str)).isin(a["variant"].astype(str)).all()


def test_cis_map_independent_signals_from_a_file(fitted, files):
    """The forward-backward selection reads the file after the window scan: the same signals as the DataFrame."""
    kwargs = {"window": 500_000, "fdr": 0.999, "independent": True, "copy": True}
    got = snf.get.cis_independent_df(snf.tl.cis_map(fitted, files["vcf.gz"], **kwargs))
    want = snf.get.cis_independent_df(snf.tl.cis_map(fitted, files["df"], variants=files["meta"], **kwargs))
    assert len(got) == len(want) > 0
    assert list(got["variant"].astype(str)) == list(want["variant"].astype(str))
    np.testing.assert_allclose(got[STATS].to_numpy(), want[STATS].to_numpy(), rtol=1e-9)
