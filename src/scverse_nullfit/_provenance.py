"""What a stored result was computed on, and the checks that refuse to use it on anything else (a leaf module).

A fit records a fingerprint of the cells it saw (their number, their names in order and as a set, and each cell's
donor) and a unique ``fit_id``; results derived from a fit (a cis map) record the fit's key and ``fit_id``. Every
consumer compares the record with the AnnData it is given, so results are never used silently on cells they do not
describe. Genes need no fingerprint: everything per gene lives in ``varm``, which anndata subsets, reorders and
concatenates together with ``var``.
"""

from __future__ import annotations

import hashlib
import uuid
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

#: Entry of ``uns[key]`` holding the fingerprint of the cells.
CELLS = "cells"
#: Entry of ``uns[key]`` holding the unique identifier of a fit.
FIT_ID = "fit_id"
#: Entry of a derived result's ``uns[key]`` naming the fit it came from (``{"key": ..., "fit_id": ...}``).
SOURCE = "source"


def new_fit_id() -> str:
    """A fresh identifier for one fit (random; survives h5ad as a string)."""
    return uuid.uuid4().hex


def _hashes(values: pd.Index | np.ndarray) -> np.ndarray:
    """pandas' hash of each value as a string (strings are hashed as they are, without a conversion)."""
    index = values if isinstance(values, pd.Index) else pd.Index(np.asarray(values, dtype=object))
    if pd.api.types.infer_dtype(index, skipna=False) != "string":
        index = pd.Index(np.asarray(values).astype(str))
    return pd.util.hash_pandas_object(index, index=False).to_numpy()


def _label_hashes(labels: np.ndarray) -> np.ndarray:
    """:func:`_hashes` of labels with few distinct values (donor IDs): each distinct label hashed once."""
    labels = np.asarray(labels)
    if pd.api.types.infer_dtype(labels, skipna=False) != "string":  # missing values as their text, like _hashes
        labels = labels.astype(str)
    codes, uniques = pd.factorize(labels)
    return _hashes(np.asarray(uniques))[codes]


def cell_fingerprint(obs_names: pd.Index, donor_labels: np.ndarray, donor_key: str) -> dict:
    """Fingerprint of the cells a result describes: count, names in order, names as a set, donor of each cell."""
    h = _hashes(obs_names)
    donors = _label_hashes(donor_labels)
    return {
        "n_cells": len(obs_names),
        "order_sha256": hashlib.sha256(h.tobytes()).hexdigest(),
        "set_sum": f"{int(h.sum(dtype=np.uint64)):016x}",
        "donor_key": donor_key,
        "donors_sha256": hashlib.sha256(donors.tobytes()).hexdigest(),
    }


def _donor_labels(adata: AnnData, donor_key: str) -> np.ndarray | None:
    if donor_key not in adata.obs.columns:
        return None
    return adata.obs[donor_key].astype(str).to_numpy()


def fingerprint_of(adata: AnnData, donor_key: str) -> dict:
    """The fingerprint of ``adata``'s cells now (see :func:`cell_fingerprint`)."""
    labels = _donor_labels(adata, donor_key)
    return cell_fingerprint(adata.obs_names, np.zeros(0, str) if labels is None else labels, donor_key)


def group_fingerprint(adata: AnnData, donor_key: str, groupby: str, group: str) -> dict:
    """Fingerprint of a fit of one group of cells (``obs[groupby] == group``) stored on the whole AnnData: that of
    all its cells (:func:`fingerprint_of`), plus which of them the group is (``groupby``, ``group``,
    ``n_group_cells``, ``group_sha256``), so that a later change of the grouping column is caught too."""
    out = fingerprint_of(adata, donor_key)
    cells = adata.obs_names[adata.obs[groupby].astype(str).to_numpy() == str(group)]
    out.update(
        groupby=groupby,
        group=str(group),
        n_group_cells=len(cells),
        group_sha256=hashlib.sha256(_hashes(cells).tobytes()).hexdigest(),
    )
    return out


def _check_group(adata: AnnData, record: dict, what: str, rerun: str) -> None:
    groupby, group = str(record["groupby"]), str(record.get("group"))
    if groupby not in adata.obs.columns:
        raise ValueError(
            f"{what} was fitted on the cells with obs[{groupby!r}] == {group!r}, but obs has no column {groupby!r} "
            f"any more. {rerun}."
        )
    cells = adata.obs_names[adata.obs[groupby].astype(str).to_numpy() == group]
    if hashlib.sha256(_hashes(cells).tobytes()).hexdigest() != record.get("group_sha256"):
        raise ValueError(
            f"{what} was fitted on the {record.get('n_group_cells')} cells with obs[{groupby!r}] == {group!r}; that "
            f"group now holds {len(cells)} other cells (obs[{groupby!r}] changed since). {rerun}."
        )


def check_cells(adata: AnnData, record, what: str, rerun: str) -> None:
    """Raise a ValueError naming what changed when ``adata``'s cells are not those ``record`` describes.

    ``what`` names the stored result (e.g. ``"the null-model fit under 'nullfit'"``) and ``rerun`` the call that
    would refresh it. A result stored before fingerprints existed (no record) is accepted with a warning.
    """
    if not isinstance(record, dict) or "n_cells" not in record:
        warnings.warn(
            f"{what} records no fingerprint of its cells (written by an older version); it cannot be checked "
            f"against this AnnData. {rerun} to store one.",
            UserWarning,
            stacklevel=3,
        )
        return
    n_then, n_now = int(record["n_cells"]), adata.n_obs
    if n_now != n_then:
        how = "subset" if n_now < n_then else "added to or concatenated"
        raise ValueError(
            f"{what} was computed on {n_then} cells, but this AnnData has {n_now} cells: cells were {how} after "
            f"it. Its results describe other cells; {rerun} on these cells, or use the AnnData it was computed on."
        )
    now = fingerprint_of(adata, str(record.get("donor_key", "")))
    if now["order_sha256"] != record["order_sha256"]:
        if now["set_sum"] == record["set_sum"]:
            raise ValueError(
                f"{what} was computed on the same {n_then} cells in another order: the cells were reordered after "
                f"it. {rerun}, or restore the order (e.g. adata[original_obs_names])."
            )
        raise ValueError(
            f"{what} was computed on {n_then} other cells (their obs_names differ from this AnnData's). {rerun} on "
            "these cells."
        )
    key = record.get("donor_key")
    if now["donors_sha256"] != record.get("donors_sha256"):
        raise ValueError(
            f"{what} was computed with other donor IDs in obs[{key!r}] (the column changed, or is gone, since). "
            f"{rerun}."
        )
    if record.get("groupby") is not None:
        _check_group(adata, record, what, rerun)


def check_source(adata: AnnData, record, what: str) -> None:
    """Raise a ValueError when the fit a derived result came from has been replaced by a newer one under its key.

    A fit that is gone altogether is not an error (the derived result stands on its own).
    """
    if not isinstance(record, dict) or not record.get(FIT_ID):
        return
    key = str(record.get("key"))
    fit = adata.uns.get(key)
    if isinstance(fit, dict) and FIT_ID in fit and str(fit[FIT_ID]) != str(record[FIT_ID]):
        raise ValueError(
            f"{what} comes from an earlier fit under {key!r}; the null models stored there now are a newer fit. "
            f"Re-run the step-2 tool on the current fit (or fit again under another key_added to keep both)."
        )


def describe_frame(df: pd.DataFrame) -> str:
    """A reproducible description of a DataFrame argument (e.g. a GRM): its shape, first IDs and a checksum."""
    ids = [str(i) for i in df.index[:3]]
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(df.index.to_series().astype(str), index=False).to_numpy().tobytes())
    digest.update(np.ascontiguousarray(df.to_numpy(dtype=np.float64)).tobytes())
    return f"DataFrame {df.shape[0]} x {df.shape[1]} (first IDs {ids}), sha256 {digest.hexdigest()}"
