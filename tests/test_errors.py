"""Bad input to :func:`scverse_nullfit.tl.fit_null`: the right exception, naming the culprit, nothing written."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import scverse_nullfit as snf

from .conftest import COVARIATES, DONOR_COVARIATES


def _snapshot(adata) -> dict:
    """Everything a failed call must leave as it was."""
    return {
        "obs": list(adata.obs.columns),
        "obs_values": adata.obs.copy(),
        "var": list(adata.var.columns),
        "uns": sorted(adata.uns.keys()),
        "varm": sorted(adata.varm.keys()),
        "obsm": sorted(adata.obsm.keys()),
        "layers": sorted(adata.layers.keys()),
        "X": np.array(adata.X, copy=True),
    }


def _assert_unchanged(adata, before: dict) -> None:
    after = _snapshot(adata)
    for key in ("obs", "var", "uns", "varm", "obsm", "layers"):
        assert after[key] == before[key], key
    pd.testing.assert_frame_equal(after["obs_values"], before["obs_values"])
    np.testing.assert_array_equal(after["X"], before["X"])


def _fails(adata, exc, pattern, **kwargs):
    """Call fit_null, expect ``exc`` with a message matching ``pattern``; check nothing was written."""
    kwargs.setdefault("covariates", COVARIATES)
    before = _snapshot(adata)
    with pytest.raises(exc, match=pattern) as info:
        snf.tl.fit_null(adata, **kwargs)
    _assert_unchanged(adata, before)
    return str(info.value)


def test_donor_key_not_in_obs(adata):
    _fails(adata, KeyError, "'individual'", donor_key="individual")


def test_covariate_not_found(adata):
    _fails(adata, KeyError, "'batch'", covariates=["age", "batch"])


def test_donor_covariate_not_found(adata):
    _fails(adata, KeyError, "'genotype_pc1'", donor_covariates=["age", "genotype_pc1"])


def test_layer_not_found(adata):
    adata.layers["logcounts"] = adata.X.copy()
    _fails(adata, KeyError, "'umis'", layer="umis")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_covariate(adata, bad):
    obs = adata.obs.copy()
    obs.iloc[[3, 17, 40], obs.columns.get_loc("log_counts")] = bad
    adata.obs = obs
    msg = _fails(adata, ValueError, "'log_counts'")
    assert re.search(r"\b3\b", msg), f"the count of bad values (3) is not in the message: {msg}"


def test_missing_categorical_covariate(adata):
    obs = adata.obs.copy()
    obs.iloc[[5, 6], obs.columns.get_loc("cell_type")] = np.nan
    adata.obs = obs
    msg = _fails(adata, ValueError, "'cell_type'")
    assert re.search(r"\b2\b", msg), msg


def test_donor_covariate_varies_within_donor(adata):
    msg = _fails(adata, ValueError, "'log_counts'", donor_covariates=[*DONOR_COVARIATES, "log_counts"])
    assert "D0000" in msg  # a donor where it varies


def test_missing_donor_id(adata):
    obs = adata.obs.copy()
    obs.iloc[[0, 1], obs.columns.get_loc("donor_id")] = np.nan
    adata.obs = obs
    msg = _fails(adata, ValueError, "'donor_id'")
    assert re.search(r"\b2\b", msg), msg


def test_donors_missing_from_grm(adata):
    grm = adata.uns["grm"].iloc[3:, 3:]
    msg = _fails(adata, ValueError, "D0000", grm=grm)
    assert "D0001" in msg and "D0002" in msg
    assert re.search(r"\b3\b", msg), msg  # how many are missing


@pytest.mark.parametrize("source", ["DataFrame", "uns"])
def test_grm_not_square(adata, source):
    bad = adata.uns["grm"].iloc[:, :-1]
    if source == "uns":
        adata.uns["bad_grm"] = bad
        msg = _fails(adata, ValueError, "square", grm="bad_grm")
        assert "bad_grm" in msg
    else:
        _fails(adata, ValueError, "square", grm=bad)


def test_grm_not_symmetric(adata):
    grm = adata.uns["grm"].copy()
    grm.iloc[1, 2] += 0.1
    _fails(adata, ValueError, r"symmetric.*'D0001'.*'D0002'|symmetric.*'D0002'.*'D0001'", grm=grm)


def test_grm_ids_do_not_match(adata):
    grm = adata.uns["grm"].copy()
    grm.columns = ["X" + c for c in grm.columns]
    _fails(adata, ValueError, "XD0000", grm=grm)


def test_grm_ids_permuted_columns(adata):
    grm = adata.uns["grm"].copy()
    grm.columns = [*grm.columns[1:], grm.columns[0]]  # same IDs, different order: ambiguous, refuse
    _fails(adata, ValueError, "column", grm=grm)


def test_grm_non_finite(adata):
    grm = adata.uns["grm"].copy()
    grm.iloc[4, 4] = np.nan
    _fails(adata, ValueError, "D0004", grm=grm)


def test_grm_not_a_dataframe(adata):
    _fails(adata, ValueError, "DataFrame", grm=adata.uns["grm"].to_numpy())


def test_grm_key_not_found(adata):
    _fails(adata, KeyError, "'kinship'", grm="kinship")


def test_grm_file_not_found(adata, tmp_path):
    path = tmp_path / "nope.grm.bin"
    _fails(adata, FileNotFoundError, re.escape(str(path)), grm=path)


@pytest.mark.parametrize("how", ["bin", "prefix"])
def test_gcta_bin_size_mismatch(adata, tmp_path, how):
    prefix = tmp_path / "cohort"
    snf.io.write_grm(adata.uns["grm"], prefix)
    bin_path = tmp_path / "cohort.grm.bin"
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as fh:
        fh.truncate(size - 4 * 7)
    grm = bin_path if how == "bin" else str(prefix)
    _fails(adata, ValueError, re.escape(str(bin_path)), grm=grm)


def test_gcta_id_file_missing(adata, tmp_path):
    prefix = tmp_path / "cohort"
    snf.io.write_grm(adata.uns["grm"], prefix)
    (tmp_path / "cohort.grm.id").unlink()
    _fails(adata, FileNotFoundError, "cohort.grm.id", grm=tmp_path / "cohort.grm.bin")


def test_gene_names_not_found(adata):
    msg = _fails(adata, KeyError, "NOTAGENE", genes=["gene00001", "NOTAGENE"])
    assert "gene00001" not in msg


def test_gene_mask_wrong_length(adata):
    _fails(adata, ValueError, str(adata.n_vars), genes=np.ones(adata.n_vars - 1, dtype=bool))


@pytest.mark.parametrize("tau", [-0.5, np.nan, np.inf])
def test_bad_tau(adata, tau):
    _fails(adata, ValueError, "tau", tau=tau)


@pytest.mark.parametrize("n_threads", [0, 1.5])
def test_bad_n_threads(adata, n_threads):
    _fails(adata, ValueError, "n_threads", n_threads=n_threads)


def test_messages_show_plain_ids(adata):
    """IDs in messages are plain strings, not numpy reprs such as np.str_('D0000')."""
    msg = _fails(adata, ValueError, "'log_counts'", donor_covariates=["log_counts"])
    assert "np.str_" not in msg, msg
    msg = _fails(adata, KeyError, "NOTAGENE", genes=["NOTAGENE"])
    assert "np.str_" not in msg, msg
