"""SAIGE sparse GRMs: Matrix Market ``.mtx`` with ``.mtx.sampleIDs.txt``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import _check_unique, _frame, _require, _strip, _symmetrise_half


def _saige_id_path(mtx_path: Path) -> Path:
    name = str(mtx_path)
    candidates = [Path(name + ".sampleIDs.txt"), Path(_strip(name, (".mtx.gz", ".mtx")) + ".sampleIDs.txt")]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"sample ID file of the sparse GRM {name!r} not found (looked for {[str(c) for c in candidates]})."
    )


def read_saige_sparse_grm(path: str | os.PathLike, sample_ids: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read a SAIGE sparse GRM (``createSparseGRM.R`` output) into a dense DataFrame.

    Parameters
    ----------
    path
        The Matrix Market ``.mtx`` file (``symmetric``, or ``general`` holding one or both triangles), or its
        ``.sampleIDs.txt`` file.
    sample_ids
        The file of sample IDs, one per line in matrix order; by default ``PATH.sampleIDs.txt``, or the ``.mtx``
        path with ``.mtx`` replaced by ``.sampleIDs.txt``.

    Returns
    -------
    A symmetric DataFrame indexed and columned by sample ID; pairs absent from the file are 0.
    """
    from scipy import io as spio
    from scipy import sparse

    path = Path(path)
    if str(path).endswith(".sampleIDs.txt"):
        sample_ids = path if sample_ids is None else sample_ids
        path = Path(_strip(path, (".sampleIDs.txt",)))
        if not str(path).endswith((".mtx", ".mtx.gz")):
            path = Path(str(path) + ".mtx")
    _require(path, "sparse GRM file")
    id_path = Path(sample_ids) if sample_ids is not None else _saige_id_path(path)
    _require(id_path, "sparse GRM sample ID file")
    try:
        M = spio.mmread(str(path))
    except (ValueError, OSError, EOFError, IndexError) as err:
        raise ValueError(f"could not read {str(path)!r} as a Matrix Market file: {err}") from err
    if not sparse.issparse(M):
        M = sparse.coo_matrix(np.asarray(M))
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"{str(path)!r} holds a {M.shape[0]} x {M.shape[1]} matrix; a GRM must be square.")
    n = M.shape[0]
    with open(id_path) as fh:
        ids = [line.split()[0] for line in fh if line.strip()]
    if len(ids) == n + 1:  # a header line
        ids = ids[1:]
    if len(ids) != n:
        raise ValueError(f"{str(path)!r} is a {n} x {n} matrix but {str(id_path)!r} lists {len(ids)} sample IDs.")
    _check_unique(ids, id_path)
    G = _symmetrise_half(np.asarray(M.todense(), dtype=np.float64))  # donors x donors: dense is the target anyway
    return _frame(G, ids)
