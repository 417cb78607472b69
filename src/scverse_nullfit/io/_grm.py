"""GRM readers and writers. Every reader returns a square DataFrame indexed and columned by donor ID."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


def _strip(path: Path, suffixes: tuple[str, ...]) -> str:
    name = str(path)
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_id_file(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"GRM ID file {str(path)!r} not found.")
    ids = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{str(path)!r} line {lineno}: expected 'FID IID', found {line.strip()!r}.")
            ids.append(fields[1])
    if len(set(ids)) != len(ids):
        dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()[:5].tolist()
        raise ValueError(f"{str(path)!r} lists duplicated IIDs: {dup}.")
    return ids


def read_gcta_grm(prefix: str | os.PathLike) -> pd.DataFrame:
    """Read a GCTA binary GRM (``PREFIX.grm.bin`` with ``PREFIX.grm.id``).

    Parameters
    ----------
    prefix
        The file prefix, or the path of the ``.grm.bin`` file itself.

    Returns
    -------
    A symmetric DataFrame indexed and columned by the IIDs of the ``.grm.id`` file.
    """
    stem = _strip(Path(prefix), (".grm.bin", ".grm.id", ".grm"))
    bin_path, id_path = Path(stem + ".grm.bin"), Path(stem + ".grm.id")
    if not bin_path.exists():
        raise FileNotFoundError(f"GCTA GRM file {str(bin_path)!r} not found.")
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
    G = np.zeros((n, n))
    rows, cols = np.tril_indices(n)
    G[rows, cols] = tri
    G[cols, rows] = tri
    return pd.DataFrame(G, index=pd.Index(ids, name="donor"), columns=pd.Index(ids, name="donor"))


def write_grm(grm: pd.DataFrame, prefix: str | os.PathLike, *, fid: pd.Series | None = None) -> None:
    """Write a GRM as GCTA binary files ``PREFIX.grm.bin`` and ``PREFIX.grm.id``.

    Parameters
    ----------
    grm
        Square symmetric DataFrame indexed and columned by donor ID.
    prefix
        Output prefix.
    fid
        Family IDs by donor; the donor ID is used when omitted.
    """
    G = _validated_square(grm, "grm")
    stem = _strip(Path(prefix), (".grm.bin", ".grm.id", ".grm"))
    ids = [str(i) for i in grm.index]
    rows, cols = np.tril_indices(len(ids))
    G[rows, cols].astype("<f4").tofile(stem + ".grm.bin")
    fids = ids if fid is None else [str(fid.loc[i]) for i in grm.index]
    with open(stem + ".grm.id", "w") as fh:
        for f, i in zip(fids, ids, strict=True):
            fh.write(f"{f}\t{i}\n")


def _validated_square(grm: pd.DataFrame, name: str) -> np.ndarray:
    G = np.asarray(grm, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{name} must be square, but has shape {G.shape}.")
    return G


_READERS = {
    ".grm.bin": read_gcta_grm,
    ".grm.id": read_gcta_grm,
}


def read_grm(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GRM file, choosing the format by its suffix.

    Parameters
    ----------
    path
        A GRM file, or a GCTA prefix (``PREFIX`` with ``PREFIX.grm.bin`` beside it).

    Returns
    -------
    A square DataFrame indexed and columned by donor ID.
    """
    path = Path(path)
    name = str(path)
    for suffix, reader in _READERS.items():
        if name.endswith(suffix):
            return reader(path)
    if Path(name + ".grm.bin").exists():
        return read_gcta_grm(path)
    if not path.exists():
        raise FileNotFoundError(f"GRM file {name!r} not found.")
    raise ValueError(f"GRM file {name!r}: unknown format (supported suffixes: {sorted(_READERS)}).")
