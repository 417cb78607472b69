"""Any genotype file into a donors x variants AnnData: :func:`read_genotypes`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import preview
from ._geno_common import select_variants
from ._genotypes import GENOTYPE_SUFFIXES, open_genotypes, reader_class
from ._vcf import VcfGenotypes, merge_regions, parse_regions


def read_genotypes(
    path: str | os.PathLike,
    *,
    donors: Sequence[str] | None = None,
    variants: Sequence[str] | np.ndarray | None = None,
    regions: Iterable | str | None = None,
    **kwargs,
) -> AnnData:
    """Read genotype dosages from a VCF/BCF, PLINK 2, BGEN or PLINK 1 file into a donors x variants AnnData.

    The format follows the suffix: ``.vcf``, ``.vcf.gz``, ``.bcf`` (needs ``pip install 'scverse-nullfit[vcf]'``),
    ``.pgen`` (``[pgen]``), ``.bgen`` (``[bgen]``), ``.bed`` (``[plink]``), or a prefix with a ``.pgen`` or ``.bed``
    beside it; ``[genotypes]`` installs all four readers. Dosages count the ``alt`` allele of ``var`` (PLINK 1:
    ``allele_1``); see the "Genotype inputs" page of the docs for each format's rules on multi-allelic records
    and missing values.

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
    cls = reader_class(path)
    if cls is None and not any(Path(f"{os.fspath(path)}{s}").is_file() for s in (".pgen", ".bed")):
        raise ValueError(
            f"cannot tell the format of genotype file {os.fspath(path)!r}: expected a name ending in "
            f"{', '.join(GENOTYPE_SUFFIXES)}, or a PLINK prefix."
        )
    if regions is not None and cls is VcfGenotypes:
        kwargs["regions"] = regions
    reader = open_genotypes(path, **kwargs)
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
        cols = region_cols[select_variants(reader.var.index[region_cols], variants, reader.path)]
        X = reader.read(rows, cols)
        return AnnData(X=X, obs=reader.obs.iloc[rows].copy(), var=reader.var.iloc[cols].copy())
    finally:
        if hasattr(reader, "close"):
            reader.close()
