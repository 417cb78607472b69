"""GRM readers and writers: each format written by hand following its specification, read back, compared."""

import gzip
import sys

import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf
from scverse_nullfit.datasets import standardised_grm

from .conftest import COVARIATES, DONOR_COVARIATES

N = 7


@pytest.fixture
def grm():
    """A random symmetric positive definite matrix with string IDs that look like numbers (leading zeros)."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(N, 3 * N))
    G = A @ A.T / A.shape[1]
    ids = [f"{i:03d}" for i in range(N)]
    return pd.DataFrame(G, index=ids, columns=ids)


def _assert_grm(df, grm, *, rtol=1e-12, atol=0.0):
    assert list(df.index) == list(grm.index)
    assert list(df.columns) == list(grm.columns)
    np.testing.assert_allclose(df.to_numpy(), grm.to_numpy(), rtol=rtol, atol=atol)


def _write_ids(path, ids, *, header=None, fid=True):
    with open(path, "w") as fh:
        if header is not None:
            fh.write(header + "\n")
        for i in ids:
            fh.write(f"F{i}\t{i}\n" if fid else f"{i}\n")


# ----------------------------------------------------------------------------------------------------- GCTA


def test_gcta_binary_by_hand(tmp_path, grm):
    G = grm.to_numpy()
    with open(tmp_path / "g.grm.bin", "wb") as fh:
        for i in range(N):
            for j in range(i + 1):
                fh.write(np.float32(G[i, j]).tobytes())
    _write_ids(tmp_path / "g.grm.id", grm.index)
    expected = grm.astype(np.float32).astype(np.float64)
    for path in ("g", "g.grm.bin", "g.grm.id"):
        _assert_grm(snf.io.read_gcta_grm(tmp_path / path), expected)
        _assert_grm(snf.io.read_grm(tmp_path / path), expected)


def test_write_grm_round_trip(tmp_path, grm):
    snf.io.write_grm(grm, tmp_path / "out", n_snps=1000)
    assert (tmp_path / "out.grm.N.bin").stat().st_size == N * (N + 1) // 2 * 4
    assert np.all(np.fromfile(tmp_path / "out.grm.N.bin", dtype="<f4") == 1000)
    back = snf.io.read_grm(tmp_path / "out.grm.bin")
    _assert_grm(back, grm, rtol=1e-6, atol=1e-7)
    _assert_grm(snf.io.read_grm(tmp_path / "out.grm.N.bin"), back)
    fid = pd.Series([f"fam{i}" for i in range(N)], index=grm.index)
    snf.io.write_grm(grm, tmp_path / "fam", fid=fid)
    assert (tmp_path / "fam.grm.id").read_text().splitlines()[1] == "fam1\t001"


def test_gcta_binary_errors(tmp_path, grm):
    snf.io.write_grm(grm, tmp_path / "g")
    _write_ids(tmp_path / "g.grm.id", list(grm.index)[:-1])
    with pytest.raises(ValueError, match=r"g\.grm\.bin.*bytes"):
        snf.io.read_grm(tmp_path / "g.grm.bin")
    (tmp_path / "g.grm.id").unlink()
    with pytest.raises(FileNotFoundError, match=r"g\.grm\.id"):
        snf.io.read_grm(tmp_path / "g.grm.bin")
    with pytest.raises(FileNotFoundError, match=r"nothere\.grm\.bin"):
        snf.io.read_grm(tmp_path / "nothere.grm.bin")


def _write_grm_gz(path, G, *, order=None, drop=None, extra=None):
    n = G.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1)]
    if order is not None:
        pairs = [pairs[k] for k in order]
    if drop is not None:
        pairs = [p for p in pairs if p != drop]
    if extra is not None:
        pairs.append(extra)
    with gzip.open(path, "wt") as fh:
        for i, j in pairs:
            fh.write(f"{i + 1}\t{j + 1}\t{1000 + i}\t{G[min(i, n - 1), j]:.10e}\n")


def test_gcta_text_by_hand(tmp_path, grm):
    G = grm.to_numpy()
    order = np.random.default_rng(1).permutation(N * (N + 1) // 2)
    _write_grm_gz(tmp_path / "g.grm.gz", G, order=order)
    _write_ids(tmp_path / "g.grm.id", grm.index)
    _assert_grm(snf.io.read_gcta_grm_gz(tmp_path / "g.grm.gz"), grm, rtol=1e-10)
    _assert_grm(snf.io.read_grm(tmp_path / "g.grm.gz"), grm, rtol=1e-10)
    # a bare prefix prefers the binary file, then the text one
    _assert_grm(snf.io.read_grm(tmp_path / "g"), grm, rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop": (3, 1)}, "needs 28"),
        ({"extra": (3, 1)}, "more than once"),
        ({"extra": (N, 1)}, "out of range"),
    ],
)
def test_gcta_text_errors(tmp_path, grm, kwargs, match):
    _write_grm_gz(tmp_path / "g.grm.gz", grm.to_numpy(), **kwargs)
    _write_ids(tmp_path / "g.grm.id", grm.index)
    with pytest.raises(ValueError, match=match) as err:
        snf.io.read_grm(tmp_path / "g.grm.gz")
    assert "g.grm.gz" in str(err.value)


# ------------------------------------------------------------------------------------------------- PLINK rel

REL_ID_STYLES = {"plink2_fid": "#FID\tIID", "plink2_iid": "#IID", "plink1": None}


def _write_rel_ids(path, ids, style):
    header = REL_ID_STYLES[style]
    _write_ids(path, ids, header=header, fid=style != "plink2_iid")


@pytest.mark.parametrize("style", list(REL_ID_STYLES))
@pytest.mark.parametrize("shape", ["square", "square0", "triangle"])
@pytest.mark.parametrize("compressed", [False, True])
def test_plink_rel_text_by_hand(tmp_path, grm, style, shape, compressed):
    G = grm.to_numpy()
    lines = []
    for i in range(N):
        if shape == "square":
            row = G[i]
        elif shape == "square0":
            row = np.where(np.arange(N) <= i, G[i], 0.0)
        else:
            row = G[i, : i + 1]
        lines.append("\t".join(repr(float(v)) for v in row))
    name = "m.rel.gz" if compressed else "m.rel"
    opener = gzip.open if compressed else open
    with opener(tmp_path / name, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    _write_rel_ids(tmp_path / "m.rel.id", grm.index, style)
    _assert_grm(snf.io.read_plink_rel(tmp_path / name), grm)
    _assert_grm(snf.io.read_grm(tmp_path / name), grm)
    _assert_grm(snf.io.read_grm(tmp_path / "m.rel.id"), grm)


@pytest.mark.parametrize("shape", ["square", "triangle"])
@pytest.mark.parametrize("dtype", ["<f8", "<f4"])
def test_plink_rel_bin_by_hand(tmp_path, grm, shape, dtype):
    G = grm.to_numpy()
    values = G.ravel() if shape == "square" else np.concatenate([G[i, : i + 1] for i in range(N)])
    values.astype(dtype).tofile(tmp_path / "m.rel.bin")
    _write_rel_ids(tmp_path / "m.rel.id", grm.index, "plink2_fid")
    expected = grm.astype(dtype).astype(np.float64)
    _assert_grm(snf.io.read_grm(tmp_path / "m.rel.bin"), expected)
    _assert_grm(snf.io.read_grm(tmp_path / "m"), expected)


def test_plink_rel_errors(tmp_path, grm):
    np.zeros(N * N + 1).tofile(tmp_path / "m.rel.bin")
    _write_rel_ids(tmp_path / "m.rel.id", grm.index, "plink2_iid")
    with pytest.raises(ValueError, match=r"m\.rel\.bin.*bytes"):
        snf.io.read_grm(tmp_path / "m.rel.bin")
    (tmp_path / "m.rel").write_text("1\n0.1 1 0.2\n" + "1\n" * (N - 2))
    with pytest.raises(ValueError, match=r"m\.rel.* row 2 has 3 values"):
        snf.io.read_grm(tmp_path / "m.rel")
    (tmp_path / "m.rel.id").write_text("#FID\tSID\na\tb\n")
    with pytest.raises(ValueError, match=r"m\.rel\.id.*no IID column"):
        snf.io.read_grm(tmp_path / "m.rel")
    (tmp_path / "m.rel.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(ValueError, match="zstd"):
        snf.io.read_grm(tmp_path / "m.rel.zst")


# ---------------------------------------------------------------------------------------------- SAIGE sparse


@pytest.fixture
def sparse_grm():
    """A kinship with families (blocks) and exact zeros between them, as SAIGE's relatedness cutoff leaves."""
    G = np.eye(N) * 1.02
    for a, b, v in [(0, 1, 0.5), (0, 2, 0.49), (1, 2, 0.26), (4, 5, 0.13)]:
        G[a, b] = G[b, a] = v
    ids = [f"S{i}" for i in range(N)]
    return pd.DataFrame(G, index=ids, columns=ids)


@pytest.mark.parametrize("symmetry", ["symmetric", "general-lower", "general-full"])
@pytest.mark.parametrize("id_name", [".mtx.sampleIDs.txt", ".sampleIDs.txt"])
def test_saige_sparse_by_hand(tmp_path, sparse_grm, symmetry, id_name):
    G = sparse_grm.to_numpy()
    rows, cols = np.nonzero(np.tril(G) if symmetry != "general-full" else G)
    kind = "symmetric" if symmetry == "symmetric" else "general"
    with open(tmp_path / "sp.mtx", "w") as fh:
        fh.write(f"%%MatrixMarket matrix coordinate real {kind}\n% written by hand\n")
        fh.write(f"{N} {N} {len(rows)}\n")
        for i, j in zip(rows, cols, strict=True):
            fh.write(f"{i + 1} {j + 1} {float(G[i, j])!r}\n")
    (tmp_path / f"sp{id_name}").write_text("\n".join(sparse_grm.index) + "\n")
    _assert_grm(snf.io.read_saige_sparse_grm(tmp_path / "sp.mtx"), sparse_grm)
    _assert_grm(snf.io.read_grm(tmp_path / "sp.mtx"), sparse_grm)
    _assert_grm(snf.io.read_grm(tmp_path / f"sp{id_name}"), sparse_grm)


def test_saige_sparse_scipy_written_and_errors(tmp_path, sparse_grm):
    from scipy import io as spio
    from scipy import sparse

    spio.mmwrite(tmp_path / "w.mtx", sparse.coo_matrix(sparse_grm.to_numpy()), symmetry="symmetric")
    with pytest.raises(FileNotFoundError, match=r"w\.mtx"):
        snf.io.read_grm(tmp_path / "w.mtx")
    (tmp_path / "w.mtx.sampleIDs.txt").write_text("\n".join(sparse_grm.index[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"lists 6 sample IDs"):
        snf.io.read_grm(tmp_path / "w.mtx")
    (tmp_path / "w.mtx.sampleIDs.txt").write_text("IID\n" + "\n".join(sparse_grm.index) + "\n")  # header tolerated
    _assert_grm(snf.io.read_grm(tmp_path / "w.mtx"), sparse_grm)


# ------------------------------------------------------------------------------------------------ square table


@pytest.mark.parametrize(("suffix", "sep"), [(".tsv", "\t"), (".csv", ","), (".txt", " "), (".tsv.gz", "\t")])
@pytest.mark.parametrize("index_label", [True, False])
def test_square_table_by_hand(tmp_path, grm, suffix, sep, index_label):
    ids = list(grm.index)
    col_order = ids[::-1]  # columns in another order than rows
    lines = [sep.join((["donor"] if index_label else [""] if sep != " " else []) + col_order)]
    for i in ids:
        lines.append(sep.join([i] + [repr(float(grm.loc[i, j])) for j in col_order]))
    text = "\n".join(lines) + "\n"
    path = tmp_path / f"t{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    _assert_grm(snf.io.read_grm_table(path), grm)
    _assert_grm(snf.io.read_grm(path), grm)


def test_square_table_pandas_written_and_errors(tmp_path, grm):
    grm.to_csv(tmp_path / "p.csv")
    _assert_grm(snf.io.read_grm(tmp_path / "p.csv"), grm)
    grm.iloc[:, :-1].to_csv(tmp_path / "bad.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"bad\.tsv.*square"):
        snf.io.read_grm(tmp_path / "bad.tsv")
    other = grm.rename(columns={"000": "999"})
    other.to_csv(tmp_path / "ids.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"ids\.tsv.*differ"):
        snf.io.read_grm(tmp_path / "ids.tsv")


def test_read_grm_unknown_and_missing(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match=r"x\.json.*unknown format"):
        snf.io.read_grm(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="nothing"):
        snf.io.read_grm(tmp_path / "nothing")


# --------------------------------------------------------------------------------------- GRM from PLINK .bed


def _numpy_grm(dosage, *, min_maf, max_missing, diagonal="standardised"):
    """Direct, unchunked computation of GCTA's GRM with per-pair counts of non-missing variants."""
    observed = ~np.isnan(dosage)
    p = np.nanmean(dosage, axis=0) / 2
    maf = np.minimum(p, 1 - p)
    keep = (maf >= min_maf) & (maf > 0) & (1 - observed.mean(axis=0) <= max_missing)
    x, o, p = dosage[:, keep], observed[:, keep], p[keep]
    n = x.shape[0]
    A = np.empty((n, n))
    for j in range(n):
        for k in range(n):
            both = o[j] & o[k]
            zj = (x[j, both] - 2 * p[both]) / np.sqrt(2 * p[both] * (1 - p[both]))
            zk = (x[k, both] - 2 * p[both]) / np.sqrt(2 * p[both] * (1 - p[both]))
            A[j, k] = np.mean(zj * zk)
        if diagonal == "gcta":
            oj = o[j]
            xj, pj = x[j, oj], p[oj]
            A[j, j] = 1 + np.mean((xj**2 - (1 + 2 * pj) * xj + 2 * pj**2) / (2 * pj * (1 - pj)))
    return A, int(keep.sum())


@pytest.fixture
def bed_files(tmp_path):
    bed_reader = pytest.importorskip("bed_reader")
    rng = np.random.default_rng(3)
    n, m = 12, 300
    freq = rng.uniform(0.0, 0.5, m)
    freq[:5] = 0.0  # monomorphic
    freq[5:15] = 0.004  # rare: dropped by min_maf=0.01 (mostly monomorphic in 12 samples too)
    dosage = rng.binomial(2, freq, size=(n, m)).astype(np.float64)
    missing = rng.random((n, m)) < 0.02
    missing[:, 20:25] |= rng.random((n, 5)) < 0.4  # very incomplete variants, dropped by max_missing
    dosage[missing] = np.nan
    iids = [f"{i:03d}" for i in range(n)]
    prefix = tmp_path / "geno"
    bed_reader.to_bed(
        prefix.with_suffix(".bed"),
        dosage,
        properties={"iid": iids, "fid": [f"F{i}" for i in range(n)], "sid": [f"v{k}" for k in range(m)]},
    )
    return prefix, dosage, iids


@pytest.mark.parametrize("diagonal", ["standardised", "gcta"])
def test_grm_from_plink_equals_numpy(bed_files, diagonal):
    prefix, dosage, iids = bed_files
    expected, n_used = _numpy_grm(dosage, min_maf=0.05, max_missing=0.1, diagonal=diagonal)
    assert 0 < n_used < dosage.shape[1] - 10
    got = snf.io.grm_from_plink(prefix, min_maf=0.05, max_missing=0.1, diagonal=diagonal, chunk_variants=37)
    _assert_grm(got, pd.DataFrame(expected, index=iids, columns=iids), rtol=1e-10, atol=1e-12)
    whole = snf.io.grm_from_plink(str(prefix) + ".bed", min_maf=0.05, max_missing=0.1, diagonal=diagonal)
    _assert_grm(whole, got, rtol=1e-10, atol=1e-12)


def test_grm_from_plink_matches_simulator(tmp_path):
    """Complete genotypes: the chunked reader equals the simulator's own GCTA-style formula."""
    bed_reader = pytest.importorskip("bed_reader")
    adata = snf.datasets.simulate(n_donors=15, cells_per_donor=2.0, n_genes=2, n_cis_variants=10, seed=4)
    geno = adata.uns["genotypes"]
    bed_reader.to_bed(tmp_path / "s.bed", geno.to_numpy(), properties={"iid": list(geno.index)})
    got = snf.io.read_grm(tmp_path / "s.bed")  # defaults: min_maf=0.01
    dosage = geno.to_numpy()
    maf = np.minimum(dosage.mean(0) / 2, 1 - dosage.mean(0) / 2)
    expected = standardised_grm(dosage[:, maf >= 0.01])
    _assert_grm(got, pd.DataFrame(expected, index=geno.index, columns=geno.index), rtol=1e-10, atol=1e-12)


def test_grm_from_plink_errors(bed_files):
    import bed_reader

    prefix, _, _ = bed_files
    bed_reader.to_bed(prefix.parent / "mono.bed", np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"no variant of .*mono\.bed"):
        snf.io.grm_from_plink(prefix.parent / "mono")
    with pytest.raises(ValueError, match="min_maf"):
        snf.io.grm_from_plink(prefix, min_maf=0.7)
    (prefix.parent / "geno.fam").unlink()
    with pytest.raises(FileNotFoundError, match=r"geno\.fam"):
        snf.io.grm_from_plink(prefix)


def test_grm_from_plink_without_bed_reader(bed_files, monkeypatch):
    prefix, _, _ = bed_files
    monkeypatch.setitem(sys.modules, "bed_reader", None)
    with pytest.raises(ImportError, match=r"scverse-nullfit\[plink\]"):
        snf.io.grm_from_plink(prefix)


# ------------------------------------------------------------------------------------------ through fit_null


def test_fit_null_reads_grm_paths(tmp_path, small_adata):
    """fit_null(grm=PATH) gives the DataFrame's results: exactly with float64 formats, to float32 with GCTA."""
    adata = small_adata.copy()
    grm = adata.uns["grm"]
    kw = {"covariates": COVARIATES, "donor_covariates": DONOR_COVARIATES}
    ref = snf.tl.fit_null(adata, grm=grm, copy=True, **kw)
    grm.to_numpy().ravel().astype("<f8").tofile(tmp_path / "m.rel.bin")
    _write_rel_ids(tmp_path / "m.rel.id", grm.index, "plink2_fid")
    grm.to_csv(tmp_path / "m.tsv", sep="\t")
    snf.io.write_grm(grm, tmp_path / "g")
    cols = ["tau", "h2", "loglik", "sigma2_e"]
    for path, rtol in [("m.rel.bin", 1e-10), ("m.tsv", 1e-10), ("g.grm.bin", 1e-4), ("g", 1e-4)]:
        out = snf.tl.fit_null(adata, grm=tmp_path / path, copy=True, **kw)
        a, b = snf.get.nullfit_df(out)[cols], snf.get.nullfit_df(ref)[cols]
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=rtol, atol=rtol * 1e-2, err_msg=path)
        assert out.uns["nullfit"]["params"]["grm"] == str(tmp_path / path)
