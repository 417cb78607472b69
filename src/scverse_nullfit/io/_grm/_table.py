"""Square GRM tables (``.tsv``, ``.csv``, ``.txt``, optionally gzipped) with donor IDs as header and first column."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pandas as pd

from ._common import _check_unique, _frame, _require

TABLE_SUFFIXES = (".tsv", ".csv", ".txt", ".tsv.gz", ".csv.gz", ".txt.gz")


def read_grm_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a square GRM table with donor IDs as header and as first column.

    Parameters
    ----------
    path
        A ``.csv`` (comma-separated), ``.tsv`` (tab-separated) or ``.txt`` (whitespace-separated) file, optionally
        gzipped. The header lists the donor IDs, optionally after a label for the ID column; the first column of
        every row is the donor ID. Rows and columns may be in different orders (columns are reordered).

    Returns
    -------
    A DataFrame indexed and columned by donor ID, in the row order of the file.
    """
    path = _require(path, "GRM table")
    name = str(path).lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t" if name.endswith(".tsv") else None
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            header_line = fh.readline().rstrip("\r\n")
            body = pd.read_csv(
                fh,
                sep=sep if sep else r"\s+",
                header=None,
                dtype={0: str},
                keep_default_na=False,
                float_precision="round_trip",
            )
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"could not read {str(path)!r} as a square GRM table: {err}") from err
    header = [h.strip().strip('"') for h in (header_line.split(sep) if sep else header_line.split())]
    n = body.shape[0]
    if body.shape[1] != n + 1:
        raise ValueError(
            f"{str(path)!r} has {n} rows of {body.shape[1] - 1} values after the ID; a GRM table must be square with "
            "donor IDs as first column."
        )
    if len(header) == n + 1:
        header = header[1:]
    if len(header) != n:
        raise ValueError(f"{str(path)!r}: the header lists {len(header)} donor IDs but the table has {n} rows.")
    rows = body.iloc[:, 0].astype(str).str.strip().str.strip('"').tolist()
    _check_unique(rows, path)
    _check_unique(header, path)
    if set(rows) != set(header):
        extra = sorted(set(header) ^ set(rows))[:5]
        raise ValueError(f"{str(path)!r}: the header's donor IDs differ from the first column's (e.g. {extra}).")
    try:
        values = body.iloc[:, 1:].apply(pd.to_numeric).to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(path)!r} has non-numeric GRM entries: {err}") from err
    order = pd.Index(header).get_indexer(rows)
    return _frame(values[:, order], rows)
