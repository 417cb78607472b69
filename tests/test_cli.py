"""The command line: in-process through ``main(argv)``, plus real runs of the installed console script."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf
from scverse_nullfit._cli import main

from .conftest import COVARIATES, DONOR_COVARIATES

COV_ARGS = ["--covariates", ",".join(COVARIATES), "--donor-covariates", ",".join(DONOR_COVARIATES)]
RESULT_COLUMNS = ["tau", "sigma2_g", "sigma2_e", "h2", "loglik", "h2_pval", "loglik_null"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def results(path_or_adata, key="nullfit") -> pd.DataFrame:
    if isinstance(path_or_adata, str | Path):
        with h5py.File(path_or_adata, "r") as f:  # only what is needed (fast even when uns is large)
            return ad.io.read_elem(f[f"varm/{key}"])
    return path_or_adata.varm[key]


def assert_same_fit(a: pd.DataFrame, b: pd.DataFrame, *, rtol=1e-10):
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(
        a[RESULT_COLUMNS].to_numpy(float), b[RESULT_COLUMNS].to_numpy(float), rtol=rtol, atol=rtol * 1e-2
    )
    np.testing.assert_array_equal(a["converged"].to_numpy(), b["converged"].to_numpy())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def example_h5ad(tmp_path_factory):
    """The built-in example on disk (its step-2 genotype tables dropped: they are slow to write and unused here)."""
    adata = snf.datasets.example()
    del adata.uns["genotypes"], adata.uns["variants"]
    path = tmp_path_factory.mktemp("example") / "example.h5ad"
    adata.write_h5ad(path)
    return path, adata


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory):
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=8, seed=1, n_cis_variants=2)
    path = tmp_path_factory.mktemp("small") / "small.h5ad"
    adata.write_h5ad(path)
    snf.io.write_grm(adata.uns["grm"], path.parent / "small")
    return path, adata


# ------------------------------------------------------------------------------------------------ the example


def test_example_h5ad_matches_api(example_h5ad, tmp_path, capsys):
    path, adata = example_h5ad
    before = digest(path)
    out = tmp_path / "out.h5ad"
    rc, stdout, err = run(capsys, "fit-null", path, "-o", out, *COV_ARGS)
    assert rc == 0, err
    assert digest(path) == before  # the input is untouched
    expected = snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, copy=True)
    back = ad.read_h5ad(out)
    assert_same_fit(back.varm["nullfit"], expected.varm["nullfit"])
    np.testing.assert_allclose(back.varm["nullfit_resid_rot"], expected.varm["nullfit_resid_rot"], rtol=1e-8)
    assert back.uns["nullfit"]["params"]["grm"] == "grm"
    assert back.n_obs == adata.n_obs and "grm" in back.uns  # a full copy of the input plus the results
    # the summary
    assert "genes fitted      200 of 200" in stdout
    assert "converged" in stdout and "median h2" in stdout and "at tau = 0" in stdout and "wall time" in stdout
    assert str(out) in stdout and "varm['nullfit']" in stdout
    assert "correlation of h2 with true h2" in stdout
    assert leftovers(tmp_path) == []


def test_example_through_gcta_file(example_h5ad, tmp_path, capsys):
    """A GRM through a GCTA file (float32) gives the API's results within float32 storage precision."""
    path, adata = example_h5ad
    snf.io.write_grm(adata.uns["grm"], tmp_path / "ex")
    out = tmp_path / "out.h5ad"
    rc, _, err = run(capsys, "fit-null", path, "-o", out, "--grm", tmp_path / "ex.grm.bin", *COV_ARGS, "--quiet")
    assert rc == 0, err
    kw = {"covariates": COVARIATES, "donor_covariates": DONOR_COVARIATES, "copy": True}
    exact = snf.tl.fit_null(adata, grm=tmp_path / "ex.grm.bin", **kw)
    assert_same_fit(results(out), exact.varm["nullfit"])
    float64 = snf.tl.fit_null(adata, **kw)
    a, b = results(out), float64.varm["nullfit"]
    np.testing.assert_allclose(a["h2"], b["h2"], atol=1e-5)
    np.testing.assert_allclose(a["loglik"], b["loglik"], rtol=1e-7)


def test_builtin_example_command(tmp_path, capsys):
    out = tmp_path / "example.h5ad"
    rc, stdout, err = run(capsys, "fit-null", "--example", "-o", out)
    assert rc == 0, err
    expected = snf.datasets.example()
    snf.tl.fit_null(expected, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    assert_same_fit(results(out), expected.varm["nullfit"])
    for text in ["built-in example", "correlation of h2 with true h2", "mean h2", "true mean", "null genes", "h2_pval"]:
        assert text in stdout
    corr = float(stdout.split("correlation of h2 with true h2")[1].split()[0])
    assert corr > 0.9


def test_demo_without_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(capsys, "demo", "--n-threads", "1")
    assert rc == 0, err
    assert "not written" in stdout and "correlation of h2 with true h2" in stdout
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the options


def test_quiet_default_debug_and_verbosity_restored(small_h5ad, tmp_path, capsys):
    from scanpy import settings

    path, _ = small_h5ad
    verbosity = settings.verbosity
    rc, stdout, err = run(capsys, "fit-null", path, "-o", tmp_path / "q.h5ad", *COV_ARGS, "--quiet")
    assert (rc, stdout, err) == (0, "", "")
    rc, stdout, err = run(capsys, "fit-null", path, "-o", tmp_path / "i.h5ad", *COV_ARGS)
    assert rc == 0 and "genes fitted" in stdout and "fitting null models" in err and "stage 1" not in err
    rc, stdout, err = run(capsys, "fit-null", path, "-o", tmp_path / "d.h5ad", *COV_ARGS, "--debug")
    assert rc == 0 and "stage 1" in err and "stage 2" in err
    assert settings.verbosity == verbosity
    assert_same_fit(results(tmp_path / "q.h5ad"), results(tmp_path / "d.h5ad"), rtol=0)


def test_options_reach_fit_null(small_h5ad, tmp_path, capsys):
    path, adata = small_h5ad
    genes = list(adata.var_names[[1, 4]])
    (tmp_path / "genes.txt").write_text(f"# wanted\n{genes[0]}\n\n{genes[1]}\n")
    out = tmp_path / "o.h5ad"
    rc, _, err = run(
        capsys, "fit-null", path, "-o", out, "--covariates", "age", "--covariates", "sex,cell_type",
        "--donor-covariates", "age", "--genes", tmp_path / "genes.txt", "--tau", "0.5", "--key-added", "nf", "-q",
    )  # fmt: skip
    assert rc == 0, err
    expected = snf.tl.fit_null(
        adata, covariates=["age", "sex", "cell_type"], donor_covariates=["age"], genes=genes, tau=0.5,
        key_added="nf", copy=True,
    )  # fmt: skip
    res = results(out, "nf")
    assert_same_fit(res, expected.varm["nf"])
    assert res["tau"].notna().sum() == 2 and (res["tau"].dropna() == 0.5).all()
    rc, _, err = run(capsys, "fit-null", path, "-o", out, "--overwrite", *COV_ARGS, "--genes", ",".join(genes), "-q")
    assert rc == 0, err
    assert results(out)["tau"].notna().sum() == 2


def test_thread_count_does_not_change_results(small_h5ad, tmp_path, capsys):
    path, _ = small_h5ad
    for n in (1, 2):
        rc, _, err = run(capsys, "fit-null", path, "-o", tmp_path / f"t{n}.h5ad", *COV_ARGS, "--n-threads", n, "-q")
        assert rc == 0, err
    assert_same_fit(results(tmp_path / "t1.h5ad"), results(tmp_path / "t2.h5ad"), rtol=1e-9)


def test_backed_input(small_h5ad, tmp_path, capsys):
    path, adata = small_h5ad
    before = digest(path)
    out = tmp_path / "b.h5ad"
    rc, stdout, err = run(capsys, "fit-null", path, "-o", out, *COV_ARGS, "--backed")
    assert rc == 0, err
    assert "backed" in stdout and digest(path) == before
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.X, adata.X)
    expected = snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, copy=True)
    assert_same_fit(back.varm["nullfit"], expected.varm["nullfit"])


def test_overwrite(small_h5ad, tmp_path, capsys):
    path, _ = small_h5ad
    out = tmp_path / "o.h5ad"
    out.write_text("old")
    rc, _, err = run(capsys, "fit-null", path, "-o", out, *COV_ARGS, "--overwrite", "-q")
    assert rc == 0, err
    assert results(out)["converged"].all()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ error paths


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--donor-key", "patient"], "'patient'"),
        (["--covariates", "age,batch"], "'batch'"),
        (["--donor-covariates", "cell_type"], "'cell_type'"),
        (["--grm", "{tmp}/missing.grm.bin"], "missing.grm.bin"),
        (["--grm", "{tmp}/missing.rel"], "missing.rel"),
        (["--grm", "nokey"], "'nokey'"),
        (["--trait-type", "binary"], "'binary'"),
        (["--trait-type", "count"], "raw counts"),
        (["--trait-type", "count", "--family", "gaussian"], "disagree"),
        (["--family", "poisson", "--layer", "counts", "--offset", "nope"], "'nope'"),
        (["--trait-type", "poisson"], "--trait-type"),
        (["--tau", "-1"], "tau"),
        (["--n-threads", "0"], "n_threads"),
        (["--genes", "nogene,gene00001"], "nogene"),
        (["--genes", "{tmp}/no/genes.txt"], "genes.txt"),
        (["--genes", "no_such_genes.txt"], "no_such_genes.txt"),
        (["--layer", "umis"], "'umis'"),
        (["--example"], "--example"),
        (["--cell-id-col", "x"], "--cell-id-col"),
    ],
)
def test_bad_input_fails_cleanly(small_h5ad, tmp_path, capsys, extra, culprit):
    path, _ = small_h5ad
    before = digest(path)
    out = tmp_path / "o.h5ad"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    rc, _stdout, err = run(capsys, "fit-null", path, "-o", out, *COV_ARGS, *extra)
    assert rc != 0
    assert culprit in err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []
    assert digest(path) == before


def test_bad_files_fail_cleanly(small_h5ad, tmp_path, capsys):
    path, adata = small_h5ad
    out = tmp_path / "o.h5ad"
    cases = []
    # missing input
    cases.append(((tmp_path / "nope.h5ad", "-o", out), "nope.h5ad"))
    # not an h5ad
    (tmp_path / "text.h5ad").write_text("not hdf5")
    cases.append(((tmp_path / "text.h5ad", "-o", out), "text.h5ad"))
    # no uns['grm'] and no --grm
    bare = adata.copy()
    del bare.uns["grm"]
    bare.write_h5ad(tmp_path / "bare.h5ad")
    cases.append(((tmp_path / "bare.h5ad", "-o", out), "--grm"))
    # output is the input, output folder missing, no input at all
    cases.append(((path, "-o", path, "--overwrite"), "input"))
    cases.append(((path, "-o", tmp_path / "nodir" / "o.h5ad"), "nodir"))
    cases.append((("-o", out), "INPUT"))
    for argv, culprit in cases:
        rc, _, err = run(capsys, "fit-null", *argv, *COV_ARGS)
        assert rc == 2, argv
        last = err.strip().splitlines()[-1]
        assert culprit in last and last.startswith("scverse-nullfit: error: ") and "Traceback" not in err, err
        assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_is_kept(small_h5ad, tmp_path, capsys):
    path, _ = small_h5ad
    out = tmp_path / "o.h5ad"
    out.write_text("precious")
    rc, _, err = run(capsys, "fit-null", path, "-o", out, *COV_ARGS)
    assert rc == 2 and "--overwrite" in err and str(out) in err
    assert out.read_text() == "precious"


def test_failed_write_leaves_nothing(small_h5ad, tmp_path, capsys, monkeypatch):
    path, _ = small_h5ad
    out = tmp_path / "o.h5ad"

    def broken_write(self, filename, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    rc, _, err = run(capsys, "fit-null", path, "-o", out, *COV_ARGS)
    assert rc == 2 and "disk full" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_debug_shows_traceback(small_h5ad, tmp_path, capsys):
    path, _ = small_h5ad
    rc, _, err = run(capsys, "fit-null", path, "-o", tmp_path / "o.h5ad", "--donor-key", "patient", "--debug")
    assert rc == 2 and "Traceback" in err and "scverse-nullfit: error: " in err


def test_usage(capsys):
    assert run(capsys, "--version")[0] == 0
    rc, stdout, _ = run(capsys, "fit-null", "--help")
    assert rc == 0 and "--pheno-covar-file" in stdout and "--n-threads" in stdout
    assert run(capsys)[0] == 2


# ------------------------------------------------------------------------------------------------ TSV (Rust flags)


@pytest.fixture
def pheno_table(small_h5ad, tmp_path):
    """The small data as a one-row-per-cell table with integer donor IDs, an integer trait and integer covariates."""
    _, adata = small_h5ad
    donors = pd.Index(adata.uns["grm"].index)
    int_ids = pd.Series(np.arange(1001, 1001 + len(donors)), index=donors)
    obs = adata.obs
    table = pd.DataFrame(
        {
            "IID": int_ids[obs["donor_id"].astype(str)].to_numpy(),
            "age": obs["age"].to_numpy(),
            "sex": obs["sex"].astype(str).to_numpy(),
            "cell_type": obs["cell_type"].astype(str).to_numpy(),
            "log_counts": obs["log_counts"].to_numpy(),
            "batch": (np.arange(adata.n_obs) % 3).astype(np.int64),  # integer-typed covariate
        }
    )
    X = np.asarray(adata.X, dtype=np.float64)
    for j, gene in enumerate(adata.var_names[:3]):
        table[gene] = X[:, j]
    table["umi"] = np.round(np.exp(X[:, 3] / 2)).astype(np.int64)  # integer-typed trait
    path = tmp_path / "pheno.tsv"
    table.to_csv(path, sep="\t", index=False)
    grm = adata.uns["grm"].rename(index=int_ids.astype(str), columns=int_ids.astype(str))
    snf.io.write_grm(grm, tmp_path / "int")
    return path, table, grm, [*list(adata.var_names[:3]), "umi"]


def test_tsv_mode_equals_anndata(pheno_table, tmp_path, capsys):
    path, table, _grm, traits = pheno_table
    out = tmp_path / "tsv.h5ad"
    covs = ["age", "sex", "cell_type", "log_counts", "batch"]
    rc, stdout, err = run(
        capsys, "fit-null", "--pheno-covar-file", path, "--trait-name", ",".join(traits), "--sample-id-col", "IID",
        "--covariate-cols", ",".join(covs), "--donor-covariate-cols", "age,sex", "--grm-file", tmp_path / "int.grm.bin",
        "--trait-type", "quantitative", "-o", out,
    )  # fmt: skip
    assert rc == 0, err
    assert "genes fitted      4 of 4" in stdout
    back = ad.read_h5ad(out)
    assert back.n_obs == len(table) and list(back.var_names) == traits
    np.testing.assert_array_equal(back.X, table[traits].to_numpy(np.float64))
    assert back.obs["IID"].astype(str).tolist() == table["IID"].astype(str).tolist()

    # the equivalent AnnData, built independently, through the API
    obs = table[["IID", *covs]].copy()
    obs["IID"] = obs["IID"].astype(str)
    for col in ["sex", "cell_type"]:
        obs[col] = obs[col].astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    ref = ad.AnnData(X=table[traits].to_numpy(np.float64), obs=obs, var=pd.DataFrame(index=traits))
    snf.tl.fit_null(
        ref, donor_key="IID", grm=snf.io.read_grm(tmp_path / "int.grm.bin"), covariates=covs,
        donor_covariates=["age", "sex"],
    )  # fmt: skip
    assert_same_fit(back.varm["nullfit"], ref.varm["nullfit"])
    assert list(back.uns["nullfit"]["covariate_names"]) == list(ref.uns["nullfit"]["covariate_names"])


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--trait-name", "gene00000,nope"], "'nope'"),
        (["--trait-name", "gene00000", "--sample-id-col", "FID"], "'FID'"),
        (["--trait-name", "gene00000", "--covariate-cols", "age,height"], "'height'"),
        (["--trait-name", "gene00000", "--trait-type", "binary"], "'binary'"),
        (["--trait-name", "gene00000", "--trait-type", "count"], "raw counts"),
        (["--trait-name", "gene00000", "--covariate-cols", "gene00000"], "'gene00000'"),
        (["--trait-name", "sex"], "'sex'"),
        ([], "--trait-name"),
    ],
)
def test_tsv_mode_errors(pheno_table, tmp_path, capsys, extra, culprit):
    path, _, _, _ = pheno_table
    out = tmp_path / "tsv.h5ad"
    argv = ["fit-null", "--pheno-covar-file", path, "--grm-file", tmp_path / "int.grm.bin", "-o", out]
    if "--sample-id-col" not in extra:
        argv += ["--sample-id-col", "IID"]
    rc, _, err = run(capsys, *argv, *extra)
    assert rc != 0 and culprit in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_tsv_missing_file(tmp_path, capsys):
    rc, _, err = run(
        capsys, "fit-null", "--pheno-covar-file", tmp_path / "p.tsv", "--trait-name", "a", "--grm-file", "g.grm.bin",
        "-o", tmp_path / "o.h5ad",
    )  # fmt: skip
    assert rc == 2 and "p.tsv" in err


# ------------------------------------------------------------------------------------------------ console script


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "scverse-nullfit"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from scverse_nullfit._cli import main; sys.exit(main())"]


def test_console_script(small_h5ad, tmp_path):
    path, adata = small_h5ad
    out = tmp_path / "o.h5ad"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*_console_script(), "fit-null", str(path), "-o", str(out), *COV_ARGS, "--grm", str(path.parent / "small")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "genes fitted      8 of 8" in proc.stdout
    expected = snf.tl.fit_null(
        adata, grm=path.parent / "small", covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, copy=True
    )
    assert_same_fit(results(out), expected.varm["nullfit"])
    # the same command again: refused, one line, no traceback
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"scverse-nullfit: error: output {str(out)!r} already exists; pass --overwrite to replace it."
    ]


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path):
    """A scheduler's SIGTERM during the write removes the hidden temporary file and ends with a clean message."""
    import os
    import signal

    from scverse_nullfit._cli._common import Terminated, atomic_output

    out = tmp_path / "out.h5ad"
    with pytest.raises(Terminated, match="SIGTERM"), atomic_output(out) as tmp:
        tmp.write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_trait_type_lists_only_what_works(capsys):
    from scverse_nullfit._cli import main

    assert main(["fit-null", "--help"]) == 0
    out = capsys.readouterr().out
    assert "binary" not in out and "{quantitative,count}" in out
