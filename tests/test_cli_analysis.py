"""The command line's analysis options: trans-map, cis-map --independent-output / --fdr, score-test --condition."""

import numpy as np
import pytest

import scverse_nullfit as snf

from .test_cli import leftovers, run
from .test_cli_step2 import STATS, _read, step2  # noqa: F401  (the module fixture)


def test_trans_map_command_equals_api(step2, tmp_path, capsys):  # noqa: F811
    out, genes_out, var_out = tmp_path / "trans.tsv", tmp_path / "g.tsv", tmp_path / "v.parquet"
    argv = ["trans-map", step2["fitted"], step2["pgen"], "-o", out, "--pval-threshold", 0.05,
            "--genes-output", genes_out, "--variants-output", var_out]  # fmt: skip
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "trans-map" in stdout and "kept" in stdout
    want = snf.tl.trans_map(step2["adata"], step2["df"], variants=step2["meta"], pval_threshold=0.05, copy=True)
    expected = snf.get.trans_df(want)
    got = _read(out)
    assert len(got) == len(expected) > 0
    assert list(got["variant"].astype(str)) == list(expected["variant"].astype(str))
    np.testing.assert_allclose(got[STATS].to_numpy(float), expected[STATS].to_numpy(float), rtol=1e-9)
    genes = _read(genes_out)
    assert list(genes["gene"]) == list(step2["adata"].var_names)
    np.testing.assert_allclose(genes["min_pval"], want.varm["trans"]["min_pval"], rtol=1e-9)
    variants = _read(var_out)
    np.testing.assert_allclose(variants["min_pval"], want.uns["trans"]["variants"]["min_pval"], rtol=1e-9)
    rc, _, err = run(capsys, "trans-map", step2["fitted"], step2["pgen"], "-o", tmp_path / "x.tsv",
                     "--pval-threshold", 0)  # fmt: skip
    assert rc == 2 and "pval-threshold" in err
    rc, _, err = run(capsys, "trans-map", step2["fitted"], step2["pgen"], "-o", out, "--genes-output", out,
                     "--overwrite")  # fmt: skip
    assert rc == 2 and "same file" in err
    assert leftovers(tmp_path) == []


def test_cis_map_independent_and_fdr_options(step2, tmp_path, capsys):  # noqa: F811
    out, genes_out, sig_out = tmp_path / "cis.tsv", tmp_path / "genes.tsv", tmp_path / "signals.tsv"
    argv = ["cis-map", step2["fitted"], step2["vcf.gz"], "-o", out, "--genes-output", genes_out,
            "--independent-output", sig_out, "--fdr", 0.5, "--fdr-method", "bh", "--gene-pval", "bonf"]  # fmt: skip
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "eGenes" in stdout and str(sig_out) in stdout
    want = snf.tl.cis_map(step2["adata"], step2["df"], variants=step2["meta"], fdr=0.5, fdr_method="bh",
                          gene_pval="bonf", independent=True, copy=True)  # fmt: skip
    summary = _read(genes_out)
    expected = snf.get.cis_genes_df(want)
    np.testing.assert_allclose(summary["qval_bonf"], expected["qval_bonf"], rtol=1e-9)
    np.testing.assert_array_equal(summary["is_egene"], expected["is_egene"])
    signals = _read(sig_out)
    exp_signals = snf.get.cis_independent_df(want)
    assert list(signals["variant"].astype(str)) == list(exp_signals["variant"].astype(str))
    np.testing.assert_allclose(signals[STATS].to_numpy(float), exp_signals[STATS].to_numpy(float), rtol=1e-9)
    rc, _, err = run(capsys, "cis-map", step2["fitted"], step2["vcf.gz"], "-o", tmp_path / "y.tsv", "--fdr", 1.5)
    assert rc == 2 and "--fdr" in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("as_file", [False, True])
def test_score_test_condition(step2, tmp_path, capsys, as_file):  # noqa: F811
    cond = list(step2["df"].columns[:2])
    value = ",".join(cond)
    if as_file:
        (tmp_path / "cond.txt").write_text("# conditioning\n" + "\n".join(cond) + "\n")
        value = tmp_path / "cond.txt"
    out = tmp_path / "st.tsv"
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["pgen"], "-o", out, "--condition", value)
    assert rc == 0, err
    want = snf.tl.score_test(step2["adata"], step2["df"], condition=cond)
    got = _read(out)
    np.testing.assert_allclose(got[STATS].to_numpy(float), want[STATS].to_numpy(float), rtol=1e-8, atol=1e-12)
    rc, _, err = run(capsys, "score-test", step2["fitted"], step2["pgen"], "-o", tmp_path / "z.tsv",
                     "--condition", "nope")  # fmt: skip
    assert rc == 2 and "nope" in err
