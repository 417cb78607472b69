"""GRM readers and writers. Every reader returns a square DataFrame indexed and columned by donor ID.

Supported formats (chosen by :func:`read_grm` from the file's suffix):

- GCTA binary: ``PREFIX.grm.bin`` (float32 lower triangle, row by row) with ``PREFIX.grm.id`` (``FID IID``);
  ``PREFIX.grm.N.bin`` (SNP counts) may sit beside them and is not needed.
- GCTA text: ``PREFIX.grm.gz`` (lines ``i j nsnp value``, 1-based indices, lower triangle) with ``PREFIX.grm.id``.
- PLINK ``--make-rel``: ``PREFIX.rel`` / ``PREFIX.rel.gz`` (text) or ``PREFIX.rel.bin`` (float64, or float32 from
  PLINK 2's ``bin4``), square, ``square0`` or triangle shape, with ``PREFIX.rel.id`` (PLINK 2 writes a header line
  ``#FID IID`` or ``#IID``; PLINK 1.9 writes ``FID IID`` without header).
- SAIGE sparse GRM: Matrix Market ``.mtx`` with its sample IDs in ``.mtx.sampleIDs.txt`` (or ``.sampleIDs.txt``).
- A square table (``.tsv``, ``.csv``, ``.txt``, optionally gzipped) with donor IDs as header and first column.
- PLINK genotypes (``.bed`` with ``.bim``/``.fam``): a GRM is computed by :func:`~scverse_nullfit.io.grm_from_plink`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ._from_plink import grm_from_plink
from ._gcta import read_gcta_grm, read_gcta_grm_gz
from ._plink_rel import read_plink_rel
from ._saige import read_saige_sparse_grm
from ._table import TABLE_SUFFIXES, read_grm_table


def _read_bed(path: Path) -> pd.DataFrame:
    return grm_from_plink(path)


def _refuse_zst(path: Path) -> pd.DataFrame:
    raise ValueError(
        f"{str(path)!r} is zstd-compressed; decompress it first (`zstd -d {path.name}`) or rerun PLINK 2 without "
        "the 'zs' modifier."
    )


#: Suffix -> reader, longest suffixes first (the first match wins).
_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".grm.N.bin": read_gcta_grm,
    ".grm.bin": read_gcta_grm,
    ".grm.id": read_gcta_grm,
    ".grm.gz": read_gcta_grm_gz,
    ".rel.bin": read_plink_rel,
    ".rel.id": read_plink_rel,
    ".rel.gz": read_plink_rel,
    ".rel.zst": _refuse_zst,
    ".rel": read_plink_rel,
    ".sampleIDs.txt": read_saige_sparse_grm,
    ".mtx.gz": read_saige_sparse_grm,
    ".mtx": read_saige_sparse_grm,
    **dict.fromkeys(TABLE_SUFFIXES, read_grm_table),
    ".bed": _read_bed,
    ".bim": _read_bed,
    ".fam": _read_bed,
}

#: What a bare prefix may stand for, in order of preference.
PREFIX_SUFFIXES = (".grm.bin", ".grm.gz", ".rel.bin", ".rel", ".rel.gz", ".bed")


def grm_prefix_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the prefix of a GRM file that :func:`read_grm` would find."""
    return any(Path(os.fspath(path) + suffix).exists() for suffix in PREFIX_SUFFIXES)


def read_grm(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GRM file, choosing the format by its suffix.

    ===================================  ==============================================================
    suffix                               format
    ===================================  ==============================================================
    ``.grm.bin`` (``.grm.id``)           GCTA binary, :func:`read_gcta_grm`
    ``.grm.gz``                          GCTA text, :func:`read_gcta_grm_gz`
    ``.rel``, ``.rel.gz``, ``.rel.bin``  PLINK ``--make-rel``, :func:`read_plink_rel`
    ``.mtx`` (``.sampleIDs.txt``)        SAIGE sparse GRM, :func:`read_saige_sparse_grm`
    ``.tsv``, ``.csv``, ``.txt``         square table, :func:`read_grm_table`
    ``.bed`` (``.bim``, ``.fam``)        PLINK genotypes, :func:`grm_from_plink` with its defaults
    ===================================  ==============================================================

    A path without these suffixes is taken as a prefix: ``PREFIX.grm.bin``, ``PREFIX.grm.gz``, ``PREFIX.rel.bin``,
    ``PREFIX.rel``, ``PREFIX.rel.gz`` or ``PREFIX.bed``, whichever exists first.

    Parameters
    ----------
    path
        A GRM file, or a prefix.

    Returns
    -------
    A square DataFrame indexed and columned by donor ID.
    """
    path = Path(path)
    name = str(path)
    for suffix, reader in _READERS.items():
        if name.endswith(suffix):
            return reader(path)
    lowered = name.lower()
    for suffix in TABLE_SUFFIXES:
        if lowered.endswith(suffix):
            return read_grm_table(path)
    for suffix in PREFIX_SUFFIXES:
        if Path(name + suffix).exists():
            return read_grm(name + suffix)
    if not path.exists():
        raise FileNotFoundError(
            f"GRM file {name!r} not found (nor a prefix with {', '.join(PREFIX_SUFFIXES)} beside it)."
        )
    raise ValueError(
        f"GRM file {name!r}: unknown format; supported suffixes: {', '.join(s for s in _READERS if s != '.rel.zst')}."
    )
