"""Genotype dosages from PLINK 1 binary files (.bed/.bim/.fam), through the optional ``bed-reader`` package."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import preview
from ._geno_common import GenotypeFile, make_unique, select_variants

PLINK_MISSING = "reading PLINK .bed files needs the optional package bed-reader: pip install 'scverse-nullfit[plink]'"


def _bed_reader():
    try:
        from bed_reader import open_bed
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(PLINK_MISSING) from err
    return open_bed


def plink_paths(bed_prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The ``.bed``, ``.bim`` and ``.fam`` paths of a prefix (``data`` or ``data.bed``), checked to exist."""
    path = Path(bed_prefix)
    stem = path.with_suffix("") if path.suffix in (".bed", ".bim", ".fam") else path
    paths = tuple(stem.parent / f"{stem.name}{ext}" for ext in (".bed", ".bim", ".fam"))
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"PLINK file {str(p)!r} not found (from bed_prefix {os.fspath(bed_prefix)!r}).")
    return paths  # type: ignore[return-value]


class PlinkGenotypes(GenotypeFile):
    """A lazily read PLINK 1 fileset: sample and variant metadata now, dosages on demand.

    Parameters
    ----------
    bed_prefix
        Path of the ``.bed`` file, with or without its extension; ``.bim`` and ``.fam`` must sit beside it.
    id_column
        How donors are named: ``"iid"`` (the individual ID, the default) or ``"fid_iid"`` (``f"{FID}_{IID}"``).
    count_A1
        Count allele 1 (the first allele column of the ``.bim``), as PLINK does; ``False`` counts allele 2. The
        counted allele is ``alt`` in :attr:`var` (and in the step-2 result tables), the other one ``ref``.
    """

    def __init__(
        self,
        bed_prefix: str | os.PathLike,
        *,
        id_column: Literal["iid", "fid_iid"] = "iid",
        count_A1: bool = True,
    ):
        if id_column not in ("iid", "fid_iid"):
            raise ValueError(f"id_column must be 'iid' or 'fid_iid', not {id_column!r}.")
        open_bed = _bed_reader()
        bed, bim, fam = plink_paths(bed_prefix)
        self.path = bed
        try:
            self._bed = open_bed(bed, bim_location=bim, fam_location=fam, count_A1=count_A1)
            iid = np.asarray(self._bed.iid).astype(str)
            fid = np.asarray(self._bed.fid).astype(str)
            sid = np.asarray(self._bed.sid).astype(str)
            chrom = np.asarray(self._bed.chromosome).astype(str)
            pos = np.asarray(self._bed.bp_position).astype(np.int64)
            a1 = np.asarray(self._bed.allele_1).astype(str)
            a2 = np.asarray(self._bed.allele_2).astype(str)
        except (ValueError, OSError, RuntimeError) as err:
            raise ValueError(f"cannot read the PLINK fileset {str(bed)!r}: {err}") from err
        ids = iid if id_column == "iid" else np.char.add(np.char.add(fid, "_"), iid)
        index = pd.Index(ids, name="donor")
        if index.has_duplicates:
            dup = index[index.duplicated()].unique()
            hint = " (use id_column='fid_iid')" if id_column == "iid" else ""
            raise ValueError(f"PLINK .fam of {str(bed)!r} has duplicated donor IDs{hint}: {preview(dup)}.")
        self.obs = pd.DataFrame({"fid": fid, "iid": iid}, index=index)
        var_index = pd.Index(sid, name="variant")
        if var_index.has_duplicates:
            # keep every variant addressable: make duplicated IDs unique the way anndata does
            var_index = pd.Index(make_unique(sid), name="variant")
        # ref/alt as in the other readers: alt is the counted allele
        alt, ref = (a1, a2) if count_A1 else (a2, a1)
        self.var = pd.DataFrame(
            {"chrom": chrom, "pos": pos, "allele_1": a1, "allele_2": a2, "ref": ref, "alt": alt}, index=var_index
        )

    #: Every donor is read (bed-reader selects rows itself).
    takes_samples = False

    def read(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
        """Dosages (float64, NaN where missing) of the given sample rows and variant columns (integer indices),
        read by bed-reader for exactly those rows and columns."""
        rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows, dtype=np.intp)
        cols = np.arange(self.shape[1]) if cols is None else np.asarray(cols, dtype=np.intp)
        if len(rows) == 0 or len(cols) == 0:
            return np.zeros((len(rows), len(cols)))
        return self._bed.read(index=np.s_[rows, cols], dtype="float64", order="C")


def read_plink_genotypes(
    bed_prefix: str | os.PathLike,
    *,
    donors: Sequence[str] | None = None,
    variants: Sequence[str] | np.ndarray | None = None,
    id_column: Literal["iid", "fid_iid"] = "iid",
    count_A1: bool = True,
) -> AnnData:
    """Read genotype dosages from a PLINK 1 binary fileset into a donors x variants AnnData.

    Needs the optional package ``bed-reader`` (``pip install 'scverse-nullfit[plink]'``).

    Parameters
    ----------
    bed_prefix
        Path of the ``.bed`` file, with or without its extension; ``.bim`` and ``.fam`` must sit beside it.
    donors
        Donor IDs to read, in the order wanted (default: all, in ``.fam`` order). Unknown IDs are an error.
    variants
        Variant IDs (``.bim`` column 2), or a boolean mask / integer indices over the ``.bim`` rows (default: all).
    id_column
        How donors are named: ``"iid"`` (the individual ID) or ``"fid_iid"`` (``f"{FID}_{IID}"``).
    count_A1
        Count allele 1 (the first allele column of the ``.bim``, PLINK's convention); ``False`` counts allele 2.

    Returns
    -------
    Donors x variants AnnData: ``X`` float64 dosages (0..2, NaN where missing); ``obs`` holds ``fid`` and ``iid``;
    ``var`` holds ``chrom`` (as in the ``.bim``, a string), ``pos`` (base-pair position), ``allele_1`` and
    ``allele_2``, and ``alt`` (the counted allele) and ``ref`` (the other), as the other genotype readers do.
    """
    src = PlinkGenotypes(bed_prefix, id_column=id_column, count_A1=count_A1)
    if donors is None:
        rows = np.arange(src.shape[0])
    else:
        wanted = pd.Index(np.atleast_1d(np.asarray(donors)).astype(str))
        rows = src.obs.index.get_indexer(wanted)
        if (rows < 0).any():
            missing = wanted[rows < 0]
            raise KeyError(f"donors not in the PLINK .fam of {str(src.path)!r}: {preview(missing)}.")
    cols = select_variants(src.var.index, variants, src.path)
    X = src.read(rows, cols)
    return AnnData(X=X, obs=src.obs.iloc[rows].copy(), var=src.var.iloc[cols].copy())
