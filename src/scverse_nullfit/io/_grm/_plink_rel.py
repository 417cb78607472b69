"""PLINK ``--make-rel`` GRMs: ``PREFIX.rel`` / ``.rel.gz`` (text) or ``.rel.bin``, with ``PREFIX.rel.id``."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import _frame, _from_lower, _read_id_file, _require, _strip, _symmetrise_half


def _rel_paths(path: Path) -> tuple[Path, Path]:
    name = str(path)
    if name.endswith(".rel.id"):
        stem = name[: -len(".rel.id")]
        for suffix in (".rel.bin", ".rel", ".rel.gz"):
            if Path(stem + suffix).exists():
                return Path(stem + suffix), Path(name)
        raise FileNotFoundError(f"no PLINK relationship matrix (.rel.bin, .rel, .rel.gz) beside {name!r}.")
    stem = _strip(path, (".rel.bin", ".rel.gz", ".rel"))
    return path, Path(stem + ".rel.id")


def read_plink_rel(path: str | os.PathLike) -> pd.DataFrame:
    """Read a PLINK ``--make-rel`` relationship matrix with its ``.rel.id`` file.

    Parameters
    ----------
    path
        ``PREFIX.rel`` or ``PREFIX.rel.gz`` (text: one row per line, square, ``square0`` or lower triangle) or
        ``PREFIX.rel.bin`` (binary float64, or float32 from PLINK 2's ``bin4``; square or lower triangle, read
        from the file size). ``PREFIX.rel.id`` lists the samples (with PLINK 2's ``#FID IID`` / ``#IID`` header,
        or PLINK 1.9's header-less ``FID IID`` lines).

    Returns
    -------
    A symmetric DataFrame indexed and columned by IID.
    """
    mat_path, id_path = _rel_paths(Path(path))
    _require(mat_path, "PLINK relationship matrix")
    ids = _read_id_file(id_path, what="PLINK .rel.id file", two_columns=False)
    n = len(ids)
    if str(mat_path).endswith(".rel.bin"):
        G = _read_rel_bin(mat_path, n, id_path)
    else:
        G = _read_rel_text(mat_path, n, id_path)
    return _frame(_symmetrise_half(G), ids)


def _read_rel_bin(path: Path, n: int, id_path: Path) -> np.ndarray:
    size = path.stat().st_size
    n_tri = n * (n + 1) // 2
    shapes = {n * n * 8: ("<f8", "square"), n_tri * 8: ("<f8", "triangle"), n * n * 4: ("<f4", "square")}
    shapes.setdefault(n_tri * 4, ("<f4", "triangle"))
    if size not in shapes:
        raise ValueError(
            f"{str(path)!r} has {size} bytes, which fits no PLINK .rel.bin shape for the {n} samples of "
            f"{str(id_path)!r} (square: {n * n * 8} bytes, triangle: {n_tri * 8} bytes as float64, or half as float32)."
        )
    dtype, shape = shapes[size]
    values = np.fromfile(path, dtype=dtype).astype(np.float64)
    if shape == "square":
        return values.reshape(n, n)
    return _from_lower(values, n)


def _read_rel_text(path: Path, n: int, id_path: Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt") as fh:
            for lineno, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(rows) >= n:
                    raise ValueError(f"{str(path)!r} has more than the {n} rows listed in {str(id_path)!r}.")
                try:
                    rows.append(np.array(fields, dtype=np.float64))
                except ValueError as err:
                    raise ValueError(f"{str(path)!r} line {lineno}: not a row of numbers ({err}).") from err
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"could not read {str(path)!r} as a PLINK text relationship matrix: {err}") from err
    if len(rows) != n:
        raise ValueError(f"{str(path)!r} has {len(rows)} rows but {str(id_path)!r} lists {n} samples.")
    lengths = np.array([len(r) for r in rows])
    if (lengths == n).all():
        return np.vstack(rows)
    if np.array_equal(lengths, np.arange(1, n + 1)):
        return _from_lower(np.concatenate(rows), n)
    bad = int(np.flatnonzero((lengths != n) & (lengths != np.arange(1, n + 1)))[0])
    raise ValueError(
        f"{str(path)!r} row {bad + 1} has {lengths[bad]} values; expected {n} (square) or {bad + 1} (triangle) for "
        f"the {n} samples of {str(id_path)!r}."
    )
