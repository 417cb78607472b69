"""Genotype dosages for the step-2 tools: the reader interface, the readers by suffix and :class:`GenotypeMatrix`.

A new file format (VCF, PGEN, BGEN, ...) is a class implementing :class:`GenotypeReader`, registered in
:data:`READERS` under its suffixes; the tools then accept such a path as ``genotypes``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._utils import is_dask, preview
from ._bgen import BgenGenotypes
from ._pgen import PgenGenotypes
from ._plink import PlinkGenotypes
from ._vcf import VcfGenotypes


@runtime_checkable
class GenotypeReader(Protocol):
    """What a genotype file reader provides (:class:`~._plink.PlinkGenotypes`, :class:`~._vcf.VcfGenotypes`,
    :class:`~._pgen.PgenGenotypes` and :class:`~._bgen.BgenGenotypes` are ones).

    Metadata is read when the reader is opened; dosages only on demand, so that a tool reads just the variants
    it tests. The package's readers also have ``obs`` (the samples' metadata), ``shape``,
    ``variant_indices(chrom, start, end)`` (the columns in a region; the file must be sorted), ``contigs`` and
    ``close()``; ``var`` holds ``ref`` and ``alt`` (the counted allele) besides ``chrom`` and ``pos``.
    """

    #: Donor (sample) IDs, in the file's order: the rows of :meth:`read`.
    donors: pd.Index
    #: Variant metadata indexed by variant ID, in the file's order (the columns of :meth:`read`); the cis map uses
    #: ``chrom`` (string) and ``pos`` (integer base-pair position) when present, and the result tables ``ref`` and
    #: ``alt`` (``alt`` is the allele that :meth:`read` counts).
    var: pd.DataFrame

    def read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Dosages of the donors ``rows`` and variants ``cols`` (integer positions, any order, possibly
        repeated): a float64 ``len(rows) x len(cols)`` array, counting the alternative allele (0..2 for
        diploids), NaN where missing."""
        ...


#: File suffix -> reader class (matched case-insensitively, longest suffix first); a path matching none is a PLINK 1
#: prefix, or a PLINK 2 one when ``PREFIX.pgen`` exists.
READERS: dict[str, Callable[..., GenotypeReader]] = {
    ".bed": PlinkGenotypes,
    ".bim": PlinkGenotypes,
    ".fam": PlinkGenotypes,
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

#: The genotype file suffixes, for messages.
GENOTYPE_SUFFIXES = (".bed", ".pgen", ".vcf", ".vcf.gz", ".bcf", ".bgen")


def reader_class(path: str | os.PathLike) -> Callable[..., GenotypeReader] | None:
    """The reader of ``path`` by its suffix (:data:`READERS`), None if it has none of them."""
    name = os.fspath(path).lower()
    for suffix in sorted(READERS, key=len, reverse=True):
        if name.endswith(suffix):
            return READERS[suffix]
    return None


def resolve_reader(path: str | os.PathLike) -> Callable[..., GenotypeReader]:
    """The reader :func:`open_genotypes` uses for ``path``: by suffix, else a PLINK 2 prefix if ``PATH.pgen`` exists,
    else a PLINK 1 prefix."""
    cls = reader_class(path)
    if cls is None:
        cls = PgenGenotypes if Path(f"{os.fspath(path)}.pgen").is_file() else PlinkGenotypes
    return cls


def sample_options(genotypes, donors) -> dict:
    """Reader options that read only ``donors`` from a genotype file path (htslib and pgenlib then skip the other
    samples' data, which matters when the file has many more samples than the fit has donors); ``{}`` for other
    sources and readers."""
    if not isinstance(genotypes, (str, os.PathLike)):
        return {}
    return {"samples": list(donors)} if getattr(resolve_reader(genotypes), "takes_samples", False) else {}


def open_genotypes(path: str | os.PathLike, **kwargs) -> GenotypeReader:
    """The reader of a genotype file, chosen by its suffix (:data:`READERS`); other paths are PLINK prefixes
    (PLINK 2 if ``PATH.pgen`` exists, else PLINK 1). ``kwargs`` go to the reader (e.g. ``regions`` for a VCF,
    ``samples`` for the readers with ``takes_samples``)."""
    return resolve_reader(path)(Path(path), **kwargs)


class GenotypeMatrix:
    """A donors x variants dosage matrix from a DataFrame, an AnnData (in memory or backed), a file (see
    :data:`READERS`) or any :class:`GenotypeReader`; what the step-2 tools read genotypes through.

    Checks donor and variant IDs once (unique, as strings); ``variants`` (a DataFrame indexed by variant ID) adds
    metadata columns to ``var``; ``reader_options`` go to the file reader of a path (e.g. ``regions`` for a VCF).
    ``read(rows, cols)`` returns float64 dosages (NaN where missing) and rejects infinite ones.
    """

    def __init__(self, genotypes, *, variants: pd.DataFrame | None = None, reader_options: dict | None = None):
        self._df = self._X = self._reader = None
        self._owned = False  # the reader was opened here (from a path), so close() closes it
        genotypes = donor_genotypes(genotypes)
        if isinstance(genotypes, pd.DataFrame):
            dtypes = genotypes.dtypes
            kinds = {dt: _numeric(dt) for dt in set(dtypes)}
            bad = [c for c, dt in zip(genotypes.columns, dtypes, strict=True) if not kinds[dt]]
            if bad:
                dtype = dtypes.iloc[genotypes.columns.get_loc(bad[0])]
                raise ValueError(f"genotype columns must hold numeric dosages; column {bad[0]!r} has dtype {dtype}.")
            self._df = genotypes
            donors, var = genotypes.index, pd.DataFrame(index=genotypes.columns)
            self.source = "DataFrame"
        elif isinstance(genotypes, AnnData):
            self._X = genotypes.X
            if self._X is None:
                raise ValueError("the genotype AnnData has no X (dosages).")
            donors, var = genotypes.obs_names, genotypes.var
            self.source = "AnnData"
        elif isinstance(genotypes, (str, os.PathLike)):
            self._reader = open_genotypes(genotypes, **(reader_options or {}))
            self._owned = True
            donors, var = self._reader.donors, self._reader.var
            self.source = os.fspath(genotypes)
        elif isinstance(genotypes, GenotypeReader):
            self._reader = genotypes
            donors, var = genotypes.donors, genotypes.var
            self.source = str(getattr(genotypes, "path", type(genotypes).__name__))
        else:
            raise ValueError(
                "genotypes must be a DataFrame (donors x variants), an AnnData (donors x variants) or the path of a "
                f"genotype file ({', '.join(GENOTYPE_SUFFIXES)}), not {type(genotypes).__name__}."
            )
        self.donors = pd.Index(np.asarray(donors).astype(str))
        if self.donors.has_duplicates:
            raise ValueError(
                f"genotypes have duplicated donor IDs: {preview(self.donors[self.donors.duplicated()].unique())}."
            )
        var = var.copy()
        var.index = pd.Index(np.asarray(var.index).astype(str), name=var.index.name or "variant")
        if var.index.has_duplicates:
            raise ValueError(
                f"genotypes have duplicated variant IDs: {preview(var.index[var.index.duplicated()].unique())}."
            )
        if variants is not None:
            if not isinstance(variants, pd.DataFrame):
                raise ValueError(f"variants must be a DataFrame indexed by variant ID, not {type(variants).__name__}.")
            vidx = pd.Index(np.asarray(variants.index).astype(str))
            pos = vidx.get_indexer(var.index)
            if (pos < 0).any():
                raise KeyError(f"variants has no row for genotype variants {preview(var.index[pos < 0])}.")
            extra = variants.iloc[pos]
            extra.index = var.index
            var = var.drop(columns=[c for c in extra.columns if c in var.columns]).join(extra)
        self.var = var

    @property
    def n_variants(self) -> int:
        return self.var.shape[0]

    @property
    def contigs(self) -> list[str] | None:
        """The contigs of the genotype file (all of them, even those not read), if it is a file that knows them."""
        contigs = getattr(self._reader, "contigs", None)
        return None if contigs is None else list(contigs)

    def alleles(self) -> tuple[pd.Categorical, pd.Categorical]:
        """``ref`` and ``alt`` of every variant (categoricals, NaN where unknown); see :func:`allele_columns`."""
        return allele_columns(self.var)

    def align(self, donors: pd.Index) -> np.ndarray:
        """Rows of the model's donors, in model order; donors of the fit without genotypes are an error."""
        rows = self.donors.get_indexer(donors)
        if (rows < 0).any():
            missing = donors[rows < 0]
            if (rows < 0).all() and pd.Index(donors).isin(self.var.index).any():
                raise ValueError(
                    f"donors of the null-model fit have no genotypes in {self.source}: {preview(missing)}. The "
                    "genotypes look transposed: the fit's donor IDs are among their variant IDs. Pass donors x "
                    "variants (e.g. df.T for a DataFrame, or adata.T for an AnnData)."
                )
            if (rows < 0).all():
                raise ValueError(
                    f"the genotypes ({self.source}) have no donor in common with the null-model fit: fit donors "
                    f"{preview(donors)}, genotype sample IDs {preview(self.donors)}."
                )
            hint = f" The genotypes' donor IDs look like {preview(self.donors[:3])}." if len(self.donors) else ""
            raise ValueError(
                f"donors of the null-model fit have no genotypes in {self.source}: {preview(missing)}.{hint}"
            )
        return rows

    def close(self) -> None:
        """Close the file reader if this object opened it (from a path)."""
        if self._owned and hasattr(self._reader, "close"):
            self._reader.close()

    def read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.intp)
        if self._df is not None:
            out = self._df.iloc[:, cols].to_numpy(dtype=np.float64, na_value=np.nan)[rows]
        elif self._reader is not None:
            out = self._reader.read(np.asarray(rows, dtype=np.intp), cols)
        else:
            out = _read_matrix(self._X, rows, cols)
        bad = np.isinf(out).any(axis=0)
        if bad.any():
            raise ValueError(f"genotypes have infinite dosages in variants {preview(self.var.index[cols[bad]])}.")
        return out


#: Column pairs of ``var`` naming the other and the counted allele, checked in order: our readers' ``ref``/``alt``,
#: cellink's ``a0``/``a1`` (its readers store the dosage of ``a1``, the VCF/PLINK 2 ALT allele) and PLINK 1's
#: ``allele_2``/``allele_1`` (an AnnData from :func:`~scverse_nullfit.io.read_plink_genotypes`, which counts
#: allele 1 as PLINK does).
ALLELE_COLUMNS = (("ref", "alt"), ("a0", "a1"), ("allele_2", "allele_1"))


def allele_columns(var: pd.DataFrame) -> tuple[pd.Categorical, pd.Categorical]:
    """``ref`` and ``alt`` (the counted allele) of the variants in ``var``, from the first pair of
    :data:`ALLELE_COLUMNS` that ``var`` holds; all NaN when it holds none (e.g. a DataFrame of dosages)."""
    for ref, alt in ALLELE_COLUMNS:
        if ref in var.columns and alt in var.columns:
            return _as_categorical(var[ref]), _as_categorical(var[alt])
    empty = pd.Categorical.from_codes(np.full(var.shape[0], -1), categories=pd.Index([], dtype=object))
    return empty, empty.copy()


def _as_categorical(values: pd.Series) -> pd.Categorical:
    """Allele strings as a categorical (compact in long tables, NaN-safe in h5ad)."""
    c = pd.Categorical(values)
    cats = pd.Index(np.asarray(c.categories).astype(str), dtype=object)
    if cats.has_duplicates:  # e.g. 1 and "1" in one column
        return pd.Categorical(np.where(values.notna(), values.astype(str), None))
    return pd.Categorical.from_codes(c.codes, categories=cats)


def donor_genotypes(genotypes):
    """The donors x variants AnnData of a cellink ``DonorData``-like object (its ``.G``), else ``genotypes``."""
    if isinstance(genotypes, (pd.DataFrame, AnnData, str, os.PathLike)):
        return genotypes
    G = getattr(genotypes, "G", None)
    return G if isinstance(G, AnnData) else genotypes


def _numeric(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)


def _read_matrix(X, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Columns ``cols`` and rows ``rows`` of a dense, sparse, backed or dask matrix, as a dense float64 array."""
    # backed storage wants increasing indices: read sorted unique columns, then reorder
    ucols, inverse = np.unique(cols, return_inverse=True)
    if sparse.issparse(X):
        block = X[:, ucols].toarray()
    elif is_dask(X):
        block = np.asarray(X[:, ucols].compute())
    else:  # numpy array, h5py dataset or anndata backed sparse dataset
        block = X[:, ucols]
        block = block.toarray() if sparse.issparse(block) else np.asarray(block)
    return np.asarray(block, dtype=np.float64)[rows][:, inverse]
