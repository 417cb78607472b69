"""Pieces shared by the genotype file readers (VCF/BCF, PLINK 2, BGEN).

Every reader exposes the same interface:

- ``path``: the main file; ``obs``: a DataFrame indexed by donor (sample) ID, ``donors`` its index;
- ``var``: a DataFrame indexed by variant ID with at least ``chrom`` (as written in the file), ``pos``
  (1-based base-pair position), ``ref`` and ``alt`` (the counted allele: dosages count copies of ``alt``);
- ``shape``: ``(donors, variants)``;
- ``read(rows, cols)``: float64 dosages (NaN where missing) of integer donor rows and variant columns;
- ``variant_indices(chrom, start, end)``: the variant columns on ``chrom`` with ``start <= pos <= end``
  (chromosome names match with or without a ``chr`` prefix).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .._utils import preview

#: Dosages may exceed 0..2 by this much (rounding in the file) before they are an error.
DOSAGE_TOL = 1e-6


def missing_extra(what: str, package: str, extra: str) -> ImportError:
    return ImportError(f"reading {what} needs the optional package {package}: pip install 'scverse-nullfit[{extra}]'")


def chrom_key(name) -> str:
    """A chromosome name without a leading ``chr`` (any case), for matching ``chr1`` with ``1``."""
    text = str(name).strip()
    return text[3:] if text[:3].lower() == "chr" else text


def make_unique(names: np.ndarray) -> np.ndarray:
    """Duplicated names get ``-1``, ``-2``, ... appended (as anndata does), so every variant stays addressable."""
    out = pd.Series(np.asarray(names).astype(str))
    counts = out.groupby(out).cumcount()
    return np.where(counts > 0, out + "-" + counts.astype(str), out).astype(str)


def variant_ids(ids, chrom, pos, ref, alt) -> pd.Index:
    """Variant IDs from the file, ``chrom:pos:ref:alt`` where the file has none (``.`` or empty), made unique."""
    ids = np.asarray(ids, dtype=object)
    blank = pd.isna(ids) | np.isin(ids.astype(str), ["", "."])
    if blank.any():
        made = [f"{c}:{p}:{r}:{a}" for c, p, r, a in zip(chrom[blank], pos[blank], ref[blank], alt[blank], strict=True)]
        ids = ids.copy()
        ids[blank] = made
    return pd.Index(make_unique(ids.astype(str)), name="variant")


def donor_index(ids, path, hint: str = "") -> pd.Index:
    index = pd.Index(np.asarray(ids).astype(str), name="donor")
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()
        raise ValueError(f"genotype file {str(path)!r} has duplicated sample IDs{hint}: {preview(dup)}.")
    return index


def check_dosages(out: np.ndarray, var: pd.DataFrame, cols: np.ndarray, donors: pd.Index, rows, path) -> None:
    """Raise a ValueError naming file, variant and donor if a dosage lies outside 0..2."""
    with np.errstate(invalid="ignore"):
        bad = (out < -DOSAGE_TOL) | (out > 2 + DOSAGE_TOL)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        n_bad = np.flatnonzero(bad.any(axis=0))
        raise ValueError(
            f"genotype file {str(path)!r} has dosages outside 0..2: {out[i, j]:g} for variant "
            f"{var.index[cols[j]]!r}, donor {donors[rows[i]]!r} ({len(n_bad)} variant(s) in this read)."
        )


def sorted_check(var: pd.DataFrame, path) -> None:
    """Raise a ValueError if the variants are not sorted by position within contiguous chromosomes."""
    chrom = var["chrom"].to_numpy().astype(str)
    pos = var["pos"].to_numpy()
    if len(chrom) < 2:
        return
    change = np.flatnonzero(chrom[1:] != chrom[:-1]) + 1
    starts = np.concatenate([[0], change])
    seen = chrom[starts]
    if len(set(seen)) < len(seen):
        dup = pd.Index(seen)[pd.Index(seen).duplicated()][0]
        raise ValueError(
            f"genotype file {str(path)!r} is not sorted: chromosome {dup!r} appears in more than one block "
            "(sort it, e.g. with 'bcftools sort' or 'plink2 --sort-vars')."
        )
    same = chrom[1:] == chrom[:-1]
    down = np.flatnonzero(same & (pos[1:] < pos[:-1]))
    if len(down):
        k = down[0] + 1
        raise ValueError(
            f"genotype file {str(path)!r} is not sorted by position: variant {var.index[k]!r} at "
            f"{chrom[k]}:{pos[k]} comes after {chrom[k - 1]}:{pos[k - 1]} (sort it, e.g. with 'bcftools sort' "
            "or 'plink2 --sort-vars')."
        )


class GenotypeFile:
    """Base of the file readers: the interface common to all, on top of ``obs``, ``var`` and ``_read``."""

    path: Path
    obs: pd.DataFrame
    var: pd.DataFrame
    _sorted: bool | None = None
    #: The reader takes ``samples=`` (read only those samples).
    takes_samples = True

    @property
    def donors(self) -> pd.Index:
        return self.obs.index

    @property
    def shape(self) -> tuple[int, int]:
        return self.obs.shape[0], self.var.shape[0]

    @property
    def contigs(self) -> list[str]:
        """The chromosomes of the file's variants, in order of appearance."""
        return list(pd.unique(self.var["chrom"].to_numpy()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.path)!r}: {self.shape[0]} donors x {self.shape[1]} variants)"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def read(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
        """Dosages (float64, donors x variants, NaN where missing) of integer donor rows and variant columns.

        Dosages count the ``alt`` allele of ``var``; values outside 0..2 are a ValueError naming the variant.
        """
        n, m = self.shape
        rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.intp).ravel()
        cols = np.arange(m) if cols is None else np.asarray(cols, dtype=np.intp).ravel()
        for what, idx, size in (("donor rows", rows, n), ("variant columns", cols, m)):
            if len(idx) and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"{what} out of range 0..{size - 1} for {str(self.path)!r}.")
        if len(rows) == 0 or len(cols) == 0:
            return np.zeros((len(rows), len(cols)))
        # read sorted unique columns (files are read front to back), then reorder
        ucols, inverse = np.unique(cols, return_inverse=True)
        block = self._read(ucols)  # all donors x ucols
        out = np.ascontiguousarray(block[rows][:, inverse], dtype=np.float64)
        check_dosages(out, self.var, cols, self.donors, rows, self.path)
        return out

    def _read(self, cols: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def variant_indices(self, chrom, start: float = -np.inf, end: float = np.inf) -> np.ndarray:
        """Variant columns on ``chrom`` with ``start <= pos <= end`` (``chr`` prefixes ignored), by position."""
        return region_columns(self, chrom, start, end)


def region_columns(reader, chrom, start: float = -np.inf, end: float = np.inf) -> np.ndarray:
    """Columns of ``reader.var`` on ``chrom`` with ``start <= pos <= end``; the file must be sorted (checked once,
    a ValueError naming the file and the first variant out of order)."""
    if not getattr(reader, "_sorted", False):
        sorted_check(reader.var, reader.path)
        reader._sorted = True
        reader._chrom_keys = np.array([chrom_key(c) for c in reader.var["chrom"].to_numpy()], dtype=object)
    on = np.flatnonzero(reader._chrom_keys == chrom_key(chrom))
    if len(on) == 0:
        return on
    pos = reader.var["pos"].to_numpy()[on]
    lo, hi = np.searchsorted(pos, start, side="left"), np.searchsorted(pos, end, side="right")
    return on[lo:hi]


def existing(path: Path, *suffixes: str) -> Path | None:
    for s in suffixes:
        p = path.parent / f"{path.name}{s}"
        if p.is_file():
            return p
    return None


def strip_suffix(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    p = Path(path)
    for s in suffixes:
        if p.name.endswith(s):
            return p.parent / p.name[: -len(s)]
    return p


def select_variants(index: pd.Index, variants, path) -> np.ndarray:
    """Columns of the variants chosen by IDs, a boolean mask or integer indices (None: all) of a file's variants."""
    if variants is None:
        return np.arange(len(index))
    arr = np.atleast_1d(np.asarray(variants))
    if arr.dtype == bool:
        if arr.shape != (len(index),):
            raise ValueError(f"variants is a boolean mask of length {len(arr)}, but {str(path)!r} has {len(index)}.")
        return np.flatnonzero(arr)
    if np.issubdtype(arr.dtype, np.integer):
        if len(arr) and (arr.min() < -len(index) or arr.max() >= len(index)):
            raise ValueError(f"variant indices out of range for the {len(index)} variants of {str(path)!r}.")
        return np.where(arr < 0, arr + len(index), arr)
    cols = index.get_indexer(arr.astype(str))
    if (cols < 0).any():
        raise KeyError(f"variants not in genotype file {str(path)!r}: {preview(arr[cols < 0])}.")
    return cols
