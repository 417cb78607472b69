"""Genotype file readers (VCF/BCF, PLINK 2 .pgen, BGEN): small files written to each format's specification in the
test, read back and compared with the DataFrame of the same dosages; conversions by plink2/bcftools when present."""

import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf
from scverse_nullfit.io import BgenGenotypes, PgenGenotypes, VcfGenotypes, read_genotypes

N_DONORS = 9


@pytest.fixture(scope="module")
def truth():
    """Dosages (donors x variants; multiples of 1/16, some missing, hard calls on some variants) and metadata."""
    rng = np.random.default_rng(7)
    chrom = ["1"] * 6 + ["2"] * 4
    pos = [100, 250, 250, 900, 1500, 3000, 40, 500, 510, 2000]
    M = len(pos)
    ids = [f"rs{i}" for i in range(M)]
    ids[3] = "."  # no ID: named chrom:pos:ref:alt
    ref = ["A", "C", "G", "T", "AT", "C", "G", "A", "T", "C"]
    alt = ["G", "T", "A", "C", "A", "G", "T", "C", "G", "A"]
    D = rng.integers(0, 33, size=(N_DONORS, M)) / 16.0
    D[:, [1, 6]] = rng.integers(0, 3, size=(N_DONORS, 2))  # hard calls
    D[rng.random((N_DONORS, M)) < 0.1] = np.nan
    D[0, 0] = np.nan
    donors = [f"D{i:02d}" for i in range(N_DONORS)]
    names = [i if i != "." else f"{c}:{p}:{r}:{a}" for i, c, p, r, a in zip(ids, chrom, pos, ref, alt, strict=True)]
    meta = pd.DataFrame({"chrom": chrom, "pos": pos, "ref": ref, "alt": alt, "id": ids}, index=names)
    return pd.DataFrame(D, index=donors, columns=names), meta


def _check(reader, df, meta, *, atol=0.0, chrom_prefix=""):
    assert list(reader.donors) == list(df.index)
    assert list(reader.var.index) == [chrom_prefix + c if c[0].isdigit() else c for c in df.columns]
    assert list(reader.var["pos"]) == list(meta["pos"])
    assert list(reader.var["chrom"]) == [chrom_prefix + c for c in meta["chrom"]]
    assert list(reader.var["ref"]) == list(meta["ref"])
    assert list(reader.var["alt"]) == list(meta["alt"])
    assert reader.shape == df.shape
    np.testing.assert_allclose(reader.read(), df.to_numpy(), atol=atol, rtol=0)
    rows, cols = np.array([4, 0, 2]), np.array([7, 1, 1, 3])
    np.testing.assert_allclose(reader.read(rows, cols), df.to_numpy()[np.ix_(rows, cols)], atol=atol, rtol=0)
    assert reader.read(rows, np.zeros(0, int)).shape == (3, 0)


# ------------------------------------------------------------------------------------------------------ VCF


def _gt(d, phased=False):
    if np.isnan(d):
        return "./."
    k = round(float(d))
    return ("0|0", "0|1", "1|1")[k] if phased else ("0/0", "0/1", "1/1")[k]


def write_vcf(path, df, meta, *, ds=True, gt=True, chrom_prefix="chr", extra_records=(), sort=True):
    """A VCF 4.2 text file: contigs in the header, FORMAT GT (rounded dosage) and DS (the dosage, '.' if missing)."""
    lines = ["##fileformat=VCFv4.2"]
    for c in dict.fromkeys(meta["chrom"]):
        lines.append(f"##contig=<ID={chrom_prefix}{c},length=300000000>")
    lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    lines.append('##FORMAT=<ID=DS,Number=A,Type=Float,Description="Alt allele dosage">')
    lines.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *df.index]))
    fmt = ":".join(f for f, on in (("GT", gt), ("DS", ds)) if on)
    records = []
    for j, (name, m) in enumerate(meta.iterrows()):
        samples = []
        for d in df[name]:
            parts = ([_gt(d, phased=j % 2 == 1)] if gt else []) + ([("." if np.isnan(d) else f"{d:g}")] if ds else [])
            samples.append(":".join(parts))
        records.append([f"{chrom_prefix}{m.chrom}", str(m.pos), m.id, m.ref, m.alt, ".", ".", ".", fmt, *samples])
    records.extend(extra_records)
    if sort:
        order = {f"{chrom_prefix}{c}": i for i, c in enumerate(dict.fromkeys(meta["chrom"]))}
        records.sort(key=lambda r: (order[r[0]], int(r[1])))
    lines.extend("\t".join(r) for r in records)
    path.write_text("\n".join(lines) + "\n")
    return path


def bgzip_index(path):
    """bgzip and tabix-index a VCF with pysam (htslib); returns the .vcf.gz path."""
    import pysam

    out = pysam.tabix_index(str(path), preset="vcf", force=True, keep_original=True)
    return type(path)(out)


def to_bcf(vcf, bcf):
    """Convert to an indexed BCF with pysam (htslib)."""
    import pysam
    import pysam.bcftools

    with pysam.VariantFile(str(vcf)) as src, pysam.VariantFile(str(bcf), "wb", header=src.header) as dst:
        for rec in src:
            dst.write(rec)
    pysam.bcftools.index(str(bcf))
    return bcf


@pytest.fixture(scope="module")
def vcf_files(tmp_path_factory, truth):
    df, meta = truth
    d = tmp_path_factory.mktemp("vcf")
    vcf = write_vcf(d / "g.vcf", df, meta)
    gz = bgzip_index(vcf)
    bcf = to_bcf(gz, d / "g.bcf")
    return {"vcf": vcf, "vcf.gz": gz, "bcf": bcf}


@pytest.mark.parametrize("kind", ["vcf", "vcf.gz", "bcf"])
def test_vcf_dosages_equal_dataframe(vcf_files, truth, kind):
    df, meta = truth
    with VcfGenotypes(vcf_files[kind]) as reader:
        _check(reader, df, meta, chrom_prefix="chr")
        assert reader.var.loc["chr1:900:T:C", "id"] == "."
        # reads in any order, repeated, and back to the start (the unindexed file is re-read from its start)
        for cols in ([9, 8], [0, 5], [2], [9, 0]):
            np.testing.assert_array_equal(reader.read(None, cols), df.to_numpy()[:, cols])


def test_vcf_gt_only_and_ds_fallback(tmp_path, truth):
    df, meta = truth
    hard = df.round()
    reader = VcfGenotypes(write_vcf(tmp_path / "gt.vcf", hard, meta, ds=False))
    np.testing.assert_array_equal(reader.read(), hard.to_numpy())
    # field=None ignores DS (GT fills in for a missing DS: test_vcf_haploid_missing_and_multiallelic)
    reader = VcfGenotypes(write_vcf(tmp_path / "both.vcf", df, meta), field=None)
    np.testing.assert_array_equal(reader.read(), df.round().to_numpy())


def test_vcf_haploid_missing_and_multiallelic(tmp_path):
    text = "\n".join(
        [
            "##fileformat=VCFv4.2",
            "##contig=<ID=X>",
            '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
            '##FORMAT=<ID=DS,Number=A,Type=Float,Description="Dosage">',
            "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\ta\tb\tc",
            "X\t10\tv1\tA\tG\t.\t.\t.\tGT\t1\t0\t.",
            "X\t20\tv2\tA\tG,T\t.\t.\t.\tGT:DS\t1/2:1,1\t2/2:0,2\t0/0:.,.",
            "X\t30\t.\tC\tT,G\t.\t.\t.\tGT\t0/2\t./.\t1|1",
            "X\t40\tv4\tA\tG\t.\t.\t.\tGT\t0/.\t1/1\t0|1",
        ]
    )
    (tmp_path / "m.vcf").write_text(text + "\n")
    reader = VcfGenotypes(tmp_path / "m.vcf")
    assert list(reader.var.index) == ["v1", "v2:G", "v2:T", "X:30:C:T", "X:30:C:G", "v4"]
    assert list(reader.var["alt"]) == ["G", "G", "T", "T", "G", "G"]
    expected = np.array(
        [
            [1, 1, 1, 0, 1, np.nan],  # haploid 1; DS of each ALT; a half-missing call is missing
            [0, 0, 2, np.nan, np.nan, 2],
            [np.nan, 0, 0, 2, 0, 1],  # DS missing -> GT 0/0
        ]
    )
    np.testing.assert_array_equal(reader.read(), expected)
    skip = VcfGenotypes(tmp_path / "m.vcf", multiallelic="skip")
    assert list(skip.var.index) == ["v1", "v4"]
    np.testing.assert_array_equal(skip.read(), expected[:, [0, 5]])
    with pytest.raises(ValueError, match="multiallelic"):
        VcfGenotypes(tmp_path / "m.vcf", multiallelic="drop")


def test_vcf_region_reads(tmp_path, truth):
    df, meta = truth
    # a deletion starting before the first region overlaps it: it must not be taken as in the region
    dele = ["chr1", "240", "del1", "ACGTACGTACGT", "A", ".", ".", ".", "GT:DS"] + ["0/0:0"] * N_DONORS
    gz = bgzip_index(write_vcf(tmp_path / "r.vcf", df, meta, extra_records=[dele]))
    regions = ["1:250-1000", ("chr2", 500, 2000), "chr7:1-100"]  # chr7 is not in the file: nothing there
    with VcfGenotypes(gz, regions=regions) as reader:
        want = ["rs1", "rs2", "1:900:T:C", "rs7", "rs8", "rs9"]
        assert list(reader.var.index) == [w.replace("1:900", "chr1:900") for w in want]
        np.testing.assert_array_equal(reader.read(), df[want].to_numpy())
        np.testing.assert_array_equal(reader.read([1, 0], [4, 0]), df[["rs8", "rs1"]].to_numpy()[[1, 0]])
        assert list(reader.variant_indices("chr1", 250, 250)) == [0, 1]
        assert list(reader.variant_indices("2", 0, 505)) == [3]
        assert len(reader.variant_indices("3")) == 0
    # the whole file through its index: runs of nearby records each read by a region query
    whole = VcfGenotypes(gz)
    assert "del1" in whole.var.index
    cols = whole.var.index.get_indexer(["rs9", "rs0", "rs5"])
    np.testing.assert_array_equal(whole.read(None, cols), df[["rs9", "rs0", "rs5"]].to_numpy())
    # overlapping regions are merged: no variant twice
    merged = VcfGenotypes(gz, regions=["1:100-300", "1:200-1000"])
    assert list(merged.var.index) == ["rs0", "del1", "rs1", "rs2", "chr1:900:T:C"]


def test_vcf_indexed_reads_across_contigs_at_one_position(tmp_path):
    """Records at the same position on two contigs: each read through the index gets its own record."""
    df = pd.DataFrame([[0.0, 1.0, 2.0], [2.0, 0.5, 0.0]], index=["a", "b"], columns=["x", "y", "z"])
    meta = pd.DataFrame(
        {
            "chrom": ["1", "2", "2"],
            "pos": [500, 500, 500],
            "ref": ["A"] * 3,
            "alt": ["G", "C", "T"],
            "id": ["x", "y", "z"],
        },
        index=df.columns,
    )
    with VcfGenotypes(bgzip_index(write_vcf(tmp_path / "c.vcf", df, meta))) as reader:
        for j in (2, 1, 0, 1):
            np.testing.assert_array_equal(reader.read(None, [j])[:, 0], df.iloc[:, j])
        np.testing.assert_array_equal(reader.read(None, [0, 2]), df.iloc[:, [0, 2]])


def test_vcf_bad_input(tmp_path, truth):
    df, meta = truth
    vcf = write_vcf(tmp_path / "g.vcf", df, meta)
    with pytest.raises(ValueError, match=r"need an index.*bgzip g\.vcf && tabix -p vcf g\.vcf\.gz"):
        VcfGenotypes(vcf, regions=["1:1-100"])
    import pysam

    pysam.tabix_compress(str(vcf), str(tmp_path / "u.vcf.gz"))
    with pytest.raises(ValueError, match=r"tabix -p vcf u\.vcf\.gz"):
        VcfGenotypes(tmp_path / "u.vcf.gz", regions=["1:1-100"])
    with pytest.raises(FileNotFoundError, match=r"nope\.vcf"):
        VcfGenotypes(tmp_path / "nope.vcf")
    (tmp_path / "junk.vcf").write_text("this is not a VCF\n")
    with pytest.raises(ValueError, match=r"junk\.vcf"):
        VcfGenotypes(tmp_path / "junk.vcf")
    # duplicated sample IDs
    dup = df.copy()
    dup.index = ["D00", "D01", "D00", *df.index[3:]]
    with pytest.raises(ValueError, match=r"dup\.vcf.*duplicated sample IDs: 'D00'"):
        VcfGenotypes(write_vcf(tmp_path / "dup.vcf", dup, meta))
    # dosages outside 0..2: named with the variant and donor, on read
    bad = df.copy()
    bad.iloc[3, 2] = 2.5
    reader = VcfGenotypes(write_vcf(tmp_path / "bad.vcf", bad, meta))
    reader.read(None, [0, 1])
    with pytest.raises(ValueError, match=r"bad\.vcf.*outside 0\.\.2: 2\.5 for variant 'rs2', donor 'D03'"):
        reader.read(None, [1, 2])
    # unsorted file: fine to read whole, an error for position queries (names the file and the variant)
    unsorted = write_vcf(tmp_path / "unsorted.vcf", df, meta.assign(pos=meta["pos"].to_numpy()[::-1]), sort=False)
    reader = VcfGenotypes(unsorted)
    np.testing.assert_array_equal(reader.read(), df.to_numpy())
    with pytest.raises(ValueError, match=r"unsorted\.vcf.*not sorted by position.*bcftools sort"):
        reader.variant_indices("1", 0, 1000)


def test_vcf_without_cyvcf2(tmp_path, truth, monkeypatch):
    monkeypatch.setitem(sys.modules, "cyvcf2", None)
    with pytest.raises(ImportError, match=r"cyvcf2: pip install 'scverse-nullfit\[vcf\]'"):
        VcfGenotypes(tmp_path / "g.vcf")


# ------------------------------------------------------------------------------------------------------ PGEN


def write_pgen(prefix, df, meta, *, psam_header="#IID", fids=None):
    """A PLINK 2 fileset: .pgen by pgenlib's writer (dosages; -9 missing), .pvar and .psam as text."""
    import pgenlib

    D = np.where(np.isnan(df.to_numpy()), -9.0, df.to_numpy())
    w = pgenlib.PgenWriter(
        f"{prefix}.pgen".encode(), df.shape[0], variant_ct=df.shape[1], nonref_flags=False, dosage_present=True
    )
    for j in range(df.shape[1]):
        w.append_dosages(np.ascontiguousarray(D[:, j]))
    w.close()
    pvar = ["##fileformat=PVARv1.0", "#CHROM\tPOS\tID\tREF\tALT"]
    pvar += [f"{m.chrom}\t{m.pos}\t{m.id}\t{m.ref}\t{m.alt}" for m in meta.itertuples()]
    (prefix.parent / f"{prefix.name}.pvar").write_text("\n".join(pvar) + "\n")
    if fids is None:
        psam = [psam_header, *df.index]
    else:
        psam = ["#FID\tIID\tSEX", *(f"{f}\t{i}\t1" for f, i in zip(fids, df.index, strict=True))]
    (prefix.parent / f"{prefix.name}.psam").write_text("\n".join(psam) + "\n")
    return prefix


def test_pgen_dosages_equal_dataframe(tmp_path, truth):
    df, meta = truth
    prefix = write_pgen(tmp_path / "g", df, meta)
    for path in (prefix, tmp_path / "g.pgen", tmp_path / "g.pvar"):
        with PgenGenotypes(path) as reader:
            _check(reader, df, meta)
            assert list(reader.variant_indices("chr2", 500, 600)) == [7, 8]


def test_pgen_ids_and_bad_input(tmp_path, truth):
    df, meta = truth
    fids = [f"F{i % 2}" for i in range(N_DONORS)]
    write_pgen(tmp_path / "f", df, meta, fids=fids)
    reader = PgenGenotypes(tmp_path / "f", id_column="fid_iid")
    assert list(reader.donors) == [f"{f}_{i}" for f, i in zip(fids, df.index, strict=True)]
    assert list(reader.obs["sex"]) == ["1"] * N_DONORS
    # duplicated IIDs
    dup = df.copy()
    dup.index = ["D00", "D00", *df.index[2:]]
    write_pgen(tmp_path / "d", dup, meta, fids=fids)
    with pytest.raises(ValueError, match=r"d\.psam.*duplicated sample IDs \(use id_column='fid_iid'\): 'D00'"):
        PgenGenotypes(tmp_path / "d")
    assert PgenGenotypes(tmp_path / "d", id_column="fid_iid").shape == df.shape
    # missing companion files, a .pvar that disagrees with the .pgen, out-of-range dosages
    (tmp_path / "d.psam").unlink()
    with pytest.raises(FileNotFoundError, match=r"d\.psam"):
        PgenGenotypes(tmp_path / "d")
    write_pgen(tmp_path / "s", df, meta)
    lines = (tmp_path / "s.pvar").read_text().splitlines()
    (tmp_path / "s.pvar").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"holds 10 variants but .*s\.pvar' lists 9"):
        PgenGenotypes(tmp_path / "s")
    with pytest.raises(ValueError, match="id_column"):
        PgenGenotypes(tmp_path / "f", id_column="fid")
    # an unsorted .pvar reads fine, but region queries name the file and the variant out of order
    write_pgen(tmp_path / "u", df, meta.assign(pos=meta["pos"].to_numpy()[::-1]))
    reader = snf.io.open_genotypes(tmp_path / "u")  # a prefix with a .pgen beside it
    assert isinstance(reader, PgenGenotypes)
    np.testing.assert_allclose(reader.read(), df.to_numpy())
    with pytest.raises(ValueError, match=r"u\.pgen' is not sorted by position: variant 'rs1'.*plink2 --sort-vars"):
        reader.variant_indices("1", 0, 10_000)


def test_pgen_multiallelic_skipped_and_missing_pgenlib(tmp_path, truth, monkeypatch):
    df, meta = truth
    write_pgen(tmp_path / "m", df, meta)
    # a multi-allelic .pvar row (the .pgen itself is biallelic here; the reader never reads that variant)
    text = (tmp_path / "m.pvar").read_text().replace("\tT\tC\n", "\tT\tC,G\n", 1)
    (tmp_path / "m.pvar").write_text(text)
    reader = PgenGenotypes(tmp_path / "m")
    assert "1:900:T:C" not in reader.var.index and reader.shape == (N_DONORS, 9)
    np.testing.assert_allclose(reader.read(), df.drop(columns="1:900:T:C").to_numpy())
    monkeypatch.setitem(sys.modules, "pgenlib", None)
    with pytest.raises(ImportError, match=r"pgenlib: pip install 'scverse-nullfit\[pgen\]'"):
        PgenGenotypes(tmp_path / "m")


# ------------------------------------------------------------------------------------------------------ BGEN


def _probabilities(d: float, bits: int, phased: bool) -> tuple[list[int], float]:
    """Stored integers of one diploid biallelic sample (BGEN layout 2) and the dosage of allele 2 they encode."""
    M = (1 << bits) - 1
    if phased:  # per haplotype, P(allele 1)
        h1 = min(d, 1.0)
        q = [round((1 - h1) * M), round((1 - (d - h1)) * M)]
        return q, (M - q[0]) / M + (M - q[1]) / M
    p_aa, p_ab = (1 - d, d) if d <= 1 else (0.0, 2 - d)
    a, b = round(p_aa * M), round(p_ab * M)
    b = min(b, M - a)
    return [a, b], (b + 2 * (M - a - b)) / M


def write_bgen(path, df, meta, *, bits=16, embed_ids=True, phased=(), compression=1):
    """A BGEN v1.2 file written from the specification: layout 2, zlib-compressed (or not) genotype blocks.

    Alleles are stored (ref, alt), so the second is counted. Returns the dosages the file encodes (quantised).
    """
    N, M = df.shape
    flags = compression | (2 << 2) | ((1 << 31) if embed_ids else 0)
    header = struct.pack("<III", 20, M, N) + b"bgen" + struct.pack("<I", flags)
    samples = b""
    if embed_ids:
        body = b"".join(struct.pack("<H", len(s)) + s.encode() for s in df.index)
        samples = struct.pack("<II", 8 + len(body), N) + body
    out = [struct.pack("<I", len(header) + len(samples)), header, samples]
    encoded = np.full(df.shape, np.nan)
    dtype = {8: "<u1", 16: "<u2"}[bits]
    for j, m in enumerate(meta.itertuples()):
        rsid = "" if m.id == "." else m.id
        var = b""
        for s in ("" if m.id == "." else f"var{j}", rsid, str(m.chrom)):
            var += struct.pack("<H", len(s)) + s.encode()
        var += struct.pack("<IH", int(m.pos), 2)
        for a in (m.ref, m.alt):
            var += struct.pack("<I", len(a)) + a.encode()
        is_phased = j in phased
        ploidy, values = bytearray(), []
        for i, d in enumerate(df.iloc[:, j]):
            if np.isnan(d):
                ploidy.append(2 | 0x80)
                values += [0, 0]
            else:
                ploidy.append(2)
                q, encoded[i, j] = _probabilities(float(d), bits, is_phased)
                values += q
        data = struct.pack("<IHBB", N, 2, 2, 2) + bytes(ploidy) + struct.pack("<BB", int(is_phased), bits)
        data += np.asarray(values, dtype=dtype).tobytes()
        if compression:
            packed = zlib.compress(data)
            var += struct.pack("<II", len(packed) + 4, len(data)) + packed
        else:
            var += struct.pack("<I", len(data)) + data
        out.append(var)
    path.write_bytes(b"".join(out))
    return pd.DataFrame(encoded, index=df.index, columns=df.columns)


def write_sample(path, ids):
    path.write_text("ID_1 ID_2 missing sex\n0 0 0 D\n" + "".join(f"0 {i} 0 1\n" for i in ids))


@pytest.mark.parametrize(("bits", "compression"), [(16, 1), (8, 1), (8, 0)])
def test_bgen_dosages_equal_dataframe(tmp_path, truth, bits, compression):
    df, meta = truth
    encoded = write_bgen(tmp_path / "g.bgen", df, meta, bits=bits, compression=compression, phased=(2, 5))
    np.testing.assert_allclose(encoded.to_numpy(), df.to_numpy(), atol=2.0 / ((1 << bits) - 1))
    with BgenGenotypes(tmp_path / "g.bgen") as reader:
        _check(reader, encoded, meta, atol=1e-12)
        assert reader.var.loc["rs4", "varid"] == "var4"
        assert list(reader.variant_indices("chr1", 200, 1000)) == [1, 2, 3]
        if compression:  # the numpy decoder agrees with cbgen's (which cannot read uncompressed layout 2)
            for j, offset in enumerate(reader._offsets):
                np.testing.assert_allclose(reader._dosage_cbgen(offset), encoded.iloc[:, j], atol=1e-12)
        tmp = reader._tmp.name
    assert not (tmp_path / "g.bgen.metafile").exists()
    assert not __import__("os").path.exists(tmp)  # the temporary variant index is removed on close
    # ref_first=False counts the first stored allele
    flipped = BgenGenotypes(tmp_path / "g.bgen", ref_first=False)
    assert list(flipped.var["alt"]) == list(meta["ref"])
    np.testing.assert_allclose(flipped.read(), 2 - encoded.to_numpy(), atol=1e-12)


def test_bgen_sample_file(tmp_path, truth):
    df, meta = truth
    encoded = write_bgen(tmp_path / "g.bgen", df, meta, embed_ids=False)
    with pytest.raises(FileNotFoundError, match=r"g\.bgen.*no sample IDs.*sample_path"):
        BgenGenotypes(tmp_path / "g.bgen")
    write_sample(tmp_path / "g.sample", df.index)
    reader = BgenGenotypes(tmp_path / "g.bgen")
    _check(reader, encoded, meta, atol=1e-12)
    assert list(reader.obs["ID_1"]) == ["0"] * N_DONORS
    write_sample(tmp_path / "other.sample", [f"X{i}" for i in range(N_DONORS)])
    assert BgenGenotypes(tmp_path / "g.bgen", sample_path=tmp_path / "other.sample").donors[0] == "X0"
    write_sample(tmp_path / "short.sample", df.index[:3])
    with pytest.raises(ValueError, match=r"short\.sample' lists 3 samples but .*g\.bgen' holds 9"):
        BgenGenotypes(tmp_path / "g.bgen", sample_path=tmp_path / "short.sample")
    write_sample(tmp_path / "dup.sample", ["A", "A", *df.index[2:]])
    with pytest.raises(ValueError, match=r"dup\.sample.*duplicated sample IDs: 'A'"):
        BgenGenotypes(tmp_path / "g.bgen", sample_path=tmp_path / "dup.sample")
    with pytest.raises(KeyError, match="ID_3"):
        BgenGenotypes(tmp_path / "g.bgen", sample_id_column="ID_3")


def test_bgen_bad_input(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"none\.bgen"):
        BgenGenotypes(tmp_path / "none.bgen")
    (tmp_path / "junk.bgen").write_bytes(b"not a bgen file at all")
    with pytest.raises(ValueError, match=r"junk\.bgen' is not a BGEN file"):
        BgenGenotypes(tmp_path / "junk.bgen")
    monkeypatch.setitem(sys.modules, "cbgen", None)
    with pytest.raises(ImportError, match=r"cbgen: pip install 'scverse-nullfit\[bgen\]'"):
        BgenGenotypes(tmp_path / "junk.bgen")


# ------------------------------------------------------------------------------------ conversions by the tools


@pytest.mark.skipif(shutil.which("plink2") is None, reason="plink2 is not installed")
def test_plink2_conversions_agree(tmp_path, truth):
    """VCF (DS) -> .pgen and -> BGEN v1.2 by plink2; every reader gives the DataFrame's dosages."""
    df, meta = truth
    vcf = write_vcf(tmp_path / "g.vcf", df, meta, chrom_prefix="")

    def plink2(*args):
        subprocess.run(["plink2", *args], check=True, capture_output=True, cwd=tmp_path)

    plink2("--vcf", "g.vcf", "dosage=DS", "--make-pgen", "--out", "p")
    plink2("--pfile", "p", "--export", "bgen-1.2", "bits=16", "ref-first", "--out", "b")
    readers = {
        "vcf": (VcfGenotypes(vcf), 0.0),
        "pgen": (PgenGenotypes(tmp_path / "p"), 1.0 / 16384),
        "bgen": (BgenGenotypes(tmp_path / "b.bgen"), 2e-4),
    }
    for name, (reader, atol) in readers.items():
        assert list(reader.donors) == list(df.index), name
        assert list(reader.var["pos"]) == list(meta["pos"]), name
        np.testing.assert_allclose(reader.read(), df.to_numpy(), atol=atol, err_msg=name)


def test_readers_read_only_the_samples_asked_for(tmp_path, truth, vcf_files):
    df, meta = truth
    write_pgen(tmp_path / "p", df, meta)
    encoded = write_bgen(tmp_path / "b.bgen", df, meta)
    wanted = ["D07", "D02", "nobody", "D04"]
    kept = ["D02", "D04", "D07"]  # those of the file, in file order
    for path, expected in ((vcf_files["vcf.gz"], df), (vcf_files["bcf"], df), (vcf_files["vcf"], df),
                           (tmp_path / "p.pgen", df), (tmp_path / "b.bgen", encoded)):  # fmt: skip
        with snf.io.open_genotypes(path, samples=wanted) as reader:
            assert list(reader.donors) == kept, path
            np.testing.assert_allclose(reader.read(), expected.loc[kept].to_numpy(), atol=1e-12)
            np.testing.assert_allclose(reader.read([2, 0], [9, 1]), expected.loc[["D07", "D02"], ["rs9", "rs1"]])
        with snf.io.open_genotypes(path, samples=["nobody"]) as reader:  # none kept: all, so messages list them
            assert reader.shape[0] == N_DONORS


# ------------------------------------------------------------------------------------------------ read_genotypes


def test_read_genotypes_every_format(tmp_path, truth, vcf_files):
    df, meta = truth
    write_pgen(tmp_path / "p", df, meta)
    encoded = write_bgen(tmp_path / "b.bgen", df, meta)
    donors = ["D05", "D01"]
    for path, expected in (
        (vcf_files["vcf.gz"], df),
        (vcf_files["bcf"], df),
        (tmp_path / "p.pgen", df),
        (tmp_path / "p", df),
        (tmp_path / "b.bgen", encoded),
    ):
        a = read_genotypes(path, donors=donors, variants=["rs9", "rs0"])
        assert list(a.obs_names) == donors and list(a.var_names) == ["rs9", "rs0"]
        np.testing.assert_allclose(a.X, expected.loc[donors, ["rs9", "rs0"]].to_numpy(), atol=1e-12)
        assert {"chrom", "pos", "ref", "alt"} <= set(a.var.columns)
        r = read_genotypes(path, regions=["chr1:200-1000", "2:1-100"])
        assert list(r.var_names)[-1] == "rs6" and len(r.var_names) == 4, path
        np.testing.assert_allclose(r.X, expected.iloc[:, [1, 2, 3, 6]].to_numpy(), atol=1e-12)
        mask = np.zeros(10, bool)
        mask[[2, 3]] = True
        assert read_genotypes(path, variants=mask).shape == (N_DONORS, 2)
        assert read_genotypes(path, variants=[-1]).var_names[0] == "rs9"
    with pytest.raises(KeyError, match=r"donors not in genotype file .*p\.pgen'.*'nobody'"):
        read_genotypes(tmp_path / "p.pgen", donors=["nobody"])
    with pytest.raises(KeyError, match=r"variants not in genotype file .*b\.bgen'.*'rs99'"):
        read_genotypes(tmp_path / "b.bgen", variants=["rs99"])
    with pytest.raises(ValueError, match=r"cannot tell the format of genotype file .*x\.txt"):
        read_genotypes(tmp_path / "x.txt")
