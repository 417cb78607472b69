"""Helpers shared by the GRM readers: ID files, path checks, the returned DataFrame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _strip(path: Path | str, suffixes: tuple[str, ...]) -> str:
    name = str(path)
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _require(path: Path | str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} not found.")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file.")
    return path


def _check_unique(ids: list[str], path: Path) -> None:
    index = pd.Index(ids)
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"{str(path)!r} lists duplicated sample IDs: {dup}.")


def _read_id_file(path: Path | str, *, what: str = "GRM ID file", two_columns: bool = True) -> list[str]:
    """Sample IDs of a GCTA/PLINK ID file: the IID column.

    A first line starting with ``#`` is a header (PLINK 2: ``#FID IID ...`` or ``#IID ...``) naming the columns;
    without header the IID is the second column (``FID IID``), or the only one when ``two_columns`` is false and a
    line has a single field.
    """
    path = _require(path, what)
    ids: list[str] = []
    iid_col = None
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if lineno == 1 and fields[0].startswith("#"):
                names = [fields[0][1:], *fields[1:]]
                if "IID" not in names:
                    raise ValueError(f"{str(path)!r}: header line {line.strip()!r} has no IID column.")
                iid_col = names.index("IID")
                continue
            if iid_col is not None:
                if len(fields) <= iid_col:
                    raise ValueError(f"{str(path)!r} line {lineno}: expected at least {iid_col + 1} fields.")
                ids.append(fields[iid_col])
            elif len(fields) >= 2:
                ids.append(fields[1])
            elif not two_columns:
                ids.append(fields[0])
            else:
                raise ValueError(f"{str(path)!r} line {lineno}: expected 'FID IID', found {line.strip()!r}.")
    _check_unique(ids, path)
    return ids


def _frame(G: np.ndarray, ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(G, index=pd.Index(ids, name="donor"), columns=pd.Index(ids, name="donor"))


def _from_lower(tri: np.ndarray, n: int) -> np.ndarray:
    """The symmetric matrix whose lower triangle, read row by row, is ``tri``."""
    G = np.zeros((n, n))
    rows, cols = np.tril_indices(n)
    G[rows, cols] = tri
    G[cols, rows] = tri
    return G


def _symmetrise_half(G: np.ndarray) -> np.ndarray:
    """Mirror a matrix stored as one triangle with zeros in the other (PLINK ``square0``); leave others alone."""
    upper = np.triu(G, 1)
    lower = np.tril(G, -1)
    if not upper.any() and lower.any():
        return G + lower.T
    if not lower.any() and upper.any():
        return G + upper.T
    return G


def _validated_square(grm: pd.DataFrame, name: str) -> np.ndarray:
    if not isinstance(grm, pd.DataFrame):
        raise ValueError(f"{name} must be a DataFrame indexed and columned by donor ID, not {type(grm).__name__}.")
    G = np.array(grm, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{name} must be square, but has shape {G.shape}.")
    return G
