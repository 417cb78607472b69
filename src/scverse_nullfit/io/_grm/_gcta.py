"""GCTA GRMs: binary ``PREFIX.grm.bin`` / ``.grm.id`` (read and write) and text ``PREFIX.grm.gz``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import _frame, _from_lower, _read_id_file, _require, _strip, _validated_square


def read_gcta_grm(prefix: str | os.PathLike) -> pd.DataFrame:
    """Read a GCTA binary GRM (``PREFIX.grm.bin`` with ``PREFIX.grm.id``).

    Parameters
    ----------
    prefix
        The file prefix, or the path of the ``.grm.bin`` (or ``.grm.id``, ``.grm.N.bin``) file itself.

    Returns
    -------
    A symmetric DataFrame indexed and columned by the IIDs of the ``.grm.id`` file.
    """
    stem = _strip(Path(prefix), (".grm.N.bin", ".grm.bin", ".grm.id", ".grm"))
    bin_path, id_path = Path(stem + ".grm.bin"), Path(stem + ".grm.id")
    _require(bin_path, "GCTA GRM file")
    ids = _read_id_file(id_path)
    n = len(ids)
    expected = n * (n + 1) // 2 * 4
    size = bin_path.stat().st_size
    if size != expected:
        raise ValueError(
            f"{str(bin_path)!r} has {size} bytes but {str(id_path)!r} lists {n} samples, which needs {expected} bytes "
            "(float32 lower triangle)."
        )
    tri = np.fromfile(bin_path, dtype="<f4").astype(np.float64)
    return _frame(_from_lower(tri, n), ids)


def write_grm(
    grm: pd.DataFrame,
    prefix: str | os.PathLike,
    *,
    fid: pd.Series | None = None,
    n_snps: float | np.ndarray | None = None,
) -> None:
    """Write a GRM as GCTA binary files ``PREFIX.grm.bin`` and ``PREFIX.grm.id``.

    Values are stored as float32, as GCTA does (a relative precision of about 6e-8).

    Parameters
    ----------
    grm
        Square symmetric DataFrame indexed and columned by donor ID.
    prefix
        Output prefix (a trailing ``.grm.bin`` or ``.grm`` is removed).
    fid
        Family IDs by donor; the donor ID is used when omitted.
    n_snps
        If given, also write ``PREFIX.grm.N.bin``: the number of SNPs behind each entry (a scalar, or a donors x
        donors matrix).
    """
    G = _validated_square(grm, "grm")
    stem = _strip(Path(prefix), (".grm.N.bin", ".grm.bin", ".grm.id", ".grm"))
    ids = [str(i) for i in grm.index]
    if [str(c) for c in grm.columns] != ids:
        raise ValueError("grm must have the same donor IDs, in the same order, as index and columns.")
    if any(not i or any(ch.isspace() for ch in i) for i in ids):
        raise ValueError("donor IDs written to a .grm.id file must be non-empty and contain no whitespace.")
    if fid is not None:
        missing = pd.Index(ids).difference(fid.index.astype(str))
        if len(missing):
            raise KeyError(f"fid has no family ID for donors {missing[:5].tolist()}.")
        fid = fid.set_axis(fid.index.astype(str))
    rows, cols = np.tril_indices(len(ids))
    G[rows, cols].astype("<f4").tofile(stem + ".grm.bin")
    if n_snps is not None:
        N = np.broadcast_to(np.asarray(n_snps, dtype=np.float64), G.shape)
        N[rows, cols].astype("<f4").tofile(stem + ".grm.N.bin")
    fids = ids if fid is None else [str(fid.loc[i]) for i in ids]
    with open(stem + ".grm.id", "w") as fh:
        for f, i in zip(fids, ids, strict=True):
            fh.write(f"{f}\t{i}\n")


def read_gcta_grm_gz(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GCTA text GRM (``PREFIX.grm.gz`` with ``PREFIX.grm.id``), as written by ``gcta --make-grm-gz``.

    Each line is ``i j nsnp value`` with 1-based sample indices into the ``.grm.id`` file; every pair of the lower
    triangle (diagonal included) must appear once (a pair given as ``j i`` counts as ``i j``).

    Parameters
    ----------
    path
        The ``.grm.gz`` file, or its prefix.

    Returns
    -------
    A symmetric DataFrame indexed and columned by the IIDs of the ``.grm.id`` file.
    """
    stem = _strip(Path(path), (".grm.gz", ".grm.id", ".grm"))
    gz_path, id_path = Path(stem + ".grm.gz"), Path(stem + ".grm.id")
    _require(gz_path, "GCTA text GRM file")
    ids = _read_id_file(id_path)
    n = len(ids)
    try:
        table = pd.read_csv(
            gz_path,
            sep=r"\s+",
            header=None,
            compression="infer",
            comment="#",
            dtype=np.float64,
            float_precision="round_trip",
        )
    except (pd.errors.ParserError, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{str(gz_path)!r} is not a GCTA text GRM ('i j nsnp value' lines): {err}") from err
    if table.shape[1] != 4:
        raise ValueError(f"{str(gz_path)!r}: expected 4 columns 'i j nsnp value', found {table.shape[1]}.")
    ij = table.iloc[:, :2].to_numpy()
    if not np.isfinite(ij).all() or (ij != np.round(ij)).any():
        raise ValueError(f"{str(gz_path)!r}: the first two columns must be integer sample indices.")
    i = ij[:, 0].astype(np.int64) - 1
    j = ij[:, 1].astype(np.int64) - 1
    bad = (i < 0) | (j < 0) | (i >= n) | (j >= n)
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 1
        raise ValueError(
            f"{str(gz_path)!r} line {line}: index out of range 1..{n} ({str(id_path)!r} lists {n} samples)."
        )
    hi, lo = np.maximum(i, j), np.minimum(i, j)
    flat = hi * (hi + 1) // 2 + lo
    expected = n * (n + 1) // 2
    counts = np.bincount(flat, minlength=expected)
    if (counts > 1).any():
        k = int(np.flatnonzero(counts > 1)[0])
        r = int((np.sqrt(8 * k + 1) - 1) // 2)
        raise ValueError(f"{str(gz_path)!r} lists the pair ({r + 1}, {k - r * (r + 1) // 2 + 1}) more than once.")
    if len(flat) != expected:
        raise ValueError(
            f"{str(gz_path)!r} has {len(flat)} entries but {str(id_path)!r} lists {n} samples, which needs {expected} "
            "(lower triangle with diagonal)."
        )
    G = np.zeros((n, n))
    values = table.iloc[:, 3].to_numpy(dtype=np.float64)
    G[hi, lo] = values
    G[lo, hi] = values
    return _frame(G, ids)
