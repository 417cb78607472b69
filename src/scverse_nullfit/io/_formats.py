"""Genotype files by suffix: the VCF/BCF, PLINK 2 and BGEN readers, and :func:`read_genotypes`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from ._bgen import BgenGenotypes
from ._geno_common import preview
from ._pgen import PgenGenotypes
from ._vcf import VcfGenotypes

#: Suffix -> reader class of the genotype files added by this module (PLINK 1 ``.bed`` is read elsewhere).
FILE_READERS = {
    ".pgen": PgenGenotypes,
    ".pvar": PgenGenotypes,
    ".pvar.zst": PgenGenotypes,
    ".psam": PgenGenotypes,
    ".vcf": VcfGenotypes,
    ".vcf.gz": VcfGenotypes,
    ".vcf.bgz": VcfGenotypes,
    ".bcf": VcfGenotypes,
    ".bgen": BgenGenotypes,
}

#: Every genotype file suffix the package reads, for messages.
SUFFIXES = (".bed", ".pgen", ".vcf", ".vcf.gz", ".bcf", ".bgen")


def file_reader(path: str | os.PathLike) -> type | None:
    """The reader class of ``path`` by its suffix (case-insensitive); None for anything else."""
    name = os.fspath(path).lower()
    for suffix in sorted(FILE_READERS, key=len, reverse=True):
        if name.endswith(suffix):
            return FILE_READERS[suffix]
    return None


def open_genotype_file(path: str | os.PathLike, **kwargs):
    """Open a VCF/BCF, PLINK 2 or BGEN file by suffix, or a prefix with a ``.pgen`` beside it; None otherwise.

    ``kwargs`` go to the reader (e.g. ``regions`` for a VCF).
    """
    cls = file_reader(path)
    if cls is None and Path(f"{os.fspath(path)}.pgen").is_file():
        cls = PgenGenotypes
    if cls is None:
        return None
    return cls(path, **kwargs)


def read_genotypes(
    path: str | os.PathLike,
    *,
    donors: Sequence[str] | None = None,
    variants: Sequence[str] | np.ndarray | None = None,
    regions: Iterable | str | None = None,
    **kwargs,
) -> AnnData:
    """Read genotype dosages from a VCF/BCF, PLINK 2 ``.pgen`` or BGEN file into a donors x variants AnnData.

    The format follows the suffix (``.vcf``, ``.vcf.gz``, ``.bcf``, ``.pgen`` or a prefix with one beside it,
    ``.bgen``); each needs its optional package (``pip install 'scverse-nullfit[vcf]'``, ``[pgen]``, ``[bgen]``
    or ``[genotypes]`` for all). Dosages count the ``alt`` allele of ``var`` (see :class:`VcfGenotypes`,
    :class:`PgenGenotypes`, :class:`BgenGenotypes` for each format's rules on multi-allelic records and
    missing values).

    Parameters
    ----------
    path
        The genotype file.
    donors
        Donor (sample) IDs to read, in the order wanted (default: all, in file order). Unknown IDs are an error.
    variants
        Variant IDs, or a boolean mask / integer indices over the file's variants (default: all).
    regions
        Only variants in these regions: ``(chrom, start, end)`` tuples or ``"chrom:start-end"`` strings (1-based,
        inclusive, ``chr`` prefixes ignored). For a VCF/BCF this needs its index and reads only those parts.
    kwargs
        Passed to the reader (e.g. ``field``/``multiallelic`` for VCF, ``id_column`` for PLINK 2,
        ``sample_path``/``ref_first`` for BGEN).

    Returns
    -------
    Donors x variants AnnData: ``X`` float64 dosages (NaN where missing); ``obs`` the samples' metadata;
    ``var`` holds ``chrom``, ``pos``, ``ref``, ``alt`` (the counted allele) and format-specific columns.
    """
    from ._vcf import merge_regions, parse_regions

    cls = file_reader(path)
    if cls is None and not Path(f"{os.fspath(path)}.pgen").is_file():
        raise ValueError(
            f"cannot tell the format of genotype file {os.fspath(path)!r}: expected a name ending in "
            f"{', '.join(SUFFIXES[1:])} (PLINK 1 .bed files: read_plink_genotypes)."
        )
    if regions is not None and cls is VcfGenotypes:
        kwargs["regions"] = regions
    reader = open_genotype_file(path, **kwargs)
    try:
        n, m = reader.shape
        if regions is not None and cls is not VcfGenotypes:
            parts = [reader.variant_indices(c, s, e) for c, s, e in merge_regions(parse_regions(regions))]
            region_cols = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.intp)
        else:
            region_cols = np.arange(m)
        if donors is None:
            rows = np.arange(n)
        else:
            wanted = pd.Index(np.atleast_1d(np.asarray(donors)).astype(str))
            rows = reader.donors.get_indexer(wanted)
            if (rows < 0).any():
                raise KeyError(f"donors not in genotype file {str(reader.path)!r}: {preview(wanted[rows < 0])}.")
        cols = region_cols[_select(reader.var.index[region_cols], variants, reader.path)]
        X = reader.read(rows, cols)
        return AnnData(X=X, obs=reader.obs.iloc[rows].copy(), var=reader.var.iloc[cols].copy())
    finally:
        reader.close()


def _select(index: pd.Index, variants, path) -> np.ndarray:
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
