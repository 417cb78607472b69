"""A GCTA-style GRM computed from PLINK 1 binary genotypes (``.bed``/``.bim``/``.fam``) through bed-reader."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy.linalg import blas

from .._plink import _bed_reader, plink_paths
from ._common import _frame

#: Target number of float64 genotype entries (donors x variants) read at a time.
CHUNK_ELEMENTS = 1 << 22


def _add_gram(C: np.ndarray, A: np.ndarray) -> None:
    """``C += A A'`` in the lower triangle of the Fortran-ordered ``C`` (BLAS syrk: half the flops of a GEMM)."""
    out = blas.dsyrk(1.0, np.asfortranarray(A, dtype=np.float64), beta=1.0, c=C, trans=0, lower=1, overwrite_c=1)
    if out is not C:  # pragma: no cover - only when scipy could not update in place
        C[...] = out


def grm_from_plink(
    bed_prefix: str | os.PathLike,
    *,
    min_maf: float = 0.01,
    max_missing: float = 0.05,
    diagonal: Literal["standardised", "gcta"] = "standardised",
    chunk_variants: int | None = None,
) -> pd.DataFrame:
    """Compute a GCTA-style standardised GRM from PLINK 1 binary genotypes.

    With ``p_i`` the allele frequency of variant ``i`` among non-missing genotypes and
    ``z_ij = (x_ij - 2 p_i) / sqrt(2 p_i (1 - p_i))`` (0 where ``x_ij`` is missing),

    ``A_jk = sum_i z_ij z_ik / N_jk``

    where ``N_jk`` counts the variants used that are non-missing in both ``j`` and ``k`` (GCTA's definition).
    Variants are read in chunks, so memory is O(donors^2) whatever the number of variants.

    Parameters
    ----------
    bed_prefix
        Path of the ``.bed`` file, or its prefix; ``.bim`` and ``.fam`` must sit beside it.
    min_maf
        Variants with minor allele frequency below this are skipped (monomorphic ones always are).
    max_missing
        Variants with a larger fraction of missing genotypes are skipped.
    diagonal
        ``"standardised"``: ``A_jj = sum_i z_ij^2 / N_jj``, the same formula as off the diagonal (PLINK
        ``--make-rel``); ``"gcta"``: GCTA's ``--make-grm`` diagonal
        ``1 + sum_i (x_ij^2 - (1 + 2 p_i) x_ij + 2 p_i^2) / (2 p_i (1 - p_i)) / N_jj``.
    chunk_variants
        Number of variants read at a time; by default about 4 million genotypes per chunk.

    Returns
    -------
    A DataFrame indexed and columned by the IIDs of the ``.fam`` file.
    """
    if not 0 <= min_maf <= 0.5:
        raise ValueError(f"min_maf must lie in [0, 0.5], not {min_maf!r}.")
    if not 0 <= max_missing <= 1:
        raise ValueError(f"max_missing must lie in [0, 1], not {max_missing!r}.")
    if diagonal not in ("standardised", "gcta"):
        raise ValueError(f"diagonal must be 'standardised' or 'gcta', not {diagonal!r}.")
    bed_path, _, fam_path = plink_paths(bed_prefix)
    open_bed = _bed_reader()
    start = logg.info(f"computing a GRM from {str(bed_path)!r}")
    try:
        bed = open_bed(bed_path)
    except Exception as err:  # bed-reader raises its own error types for malformed files
        raise ValueError(f"could not open {str(bed_path)!r} as a PLINK .bed file: {err}") from err
    with bed:
        try:
            ids = [str(i) for i in bed.iid]
            n, m = bed.iid_count, bed.sid_count
        except Exception as err:
            raise ValueError(f"could not read the samples of {str(fam_path)!r}: {err}") from err
        if len(set(ids)) != len(ids):
            dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()[:5].tolist()
            raise ValueError(f"{str(fam_path)!r} lists duplicated IIDs: {dup}.")
        step = chunk_variants or max(1, CHUNK_ELEMENTS // max(n, 1))
        A = np.zeros((n, n), order="F")  # lower triangles only until the end
        N = np.zeros((n, n), order="F")  # pairwise counts beyond the common ones (only where genotypes are missing)
        n_common = 0  # variants used that are complete in every sample
        diag_extra = np.zeros(n)
        n_used = 0
        for a in range(0, m, step):
            b = min(m, a + step)
            try:
                X = bed.read(index=np.s_[:, a:b], dtype="float64")
            except Exception as err:
                raise ValueError(f"could not read variants {a}..{b} of {str(bed_path)!r}: {err}") from err
            observed = ~np.isnan(X)
            n_obs = observed.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                p = np.nansum(X, axis=0) / (2.0 * n_obs)
            maf = np.minimum(p, 1.0 - p)
            keep = (n_obs > 0) & (1.0 - n_obs / n <= max_missing) & (maf >= min_maf) & (maf > 0)
            if not keep.any():
                continue
            X, observed, p = X[:, keep], observed[:, keep], p[keep]
            var = 2.0 * p * (1.0 - p)
            Z = (X - 2.0 * p) / np.sqrt(var)
            Z[~observed] = 0.0
            _add_gram(A, Z)
            complete = observed.all(axis=0)
            n_common += int(complete.sum())
            if not complete.all():
                _add_gram(N, observed[:, ~complete])
            if diagonal == "gcta":
                Xo = np.where(observed, X, 0.0)
                gcta = (Xo * Xo - (1.0 + 2.0 * p) * Xo + 2.0 * p * p) / var
                diag_extra += np.where(observed, gcta, 0.0).sum(axis=1)
            n_used += int(keep.sum())
    if n_used == 0:
        raise ValueError(
            f"no variant of {str(bed_path)!r} passes min_maf={min_maf} and max_missing={max_missing}; cannot "
            "compute a GRM."
        )
    lower = np.tril_indices(n, -1)
    A[lower[1], lower[0]] = A[lower]
    N[lower[1], lower[0]] = N[lower]
    N += n_common
    if (N == 0).any():
        j, k = np.unravel_index(np.argmin(N), N.shape)
        raise ValueError(
            f"{str(bed_path)!r}: samples {ids[j]!r} and {ids[k]!r} share no non-missing variant; cannot compute a GRM."
        )
    A /= N
    if diagonal == "gcta":
        A[np.diag_indices(n)] = 1.0 + diag_extra / np.diag(N)
    logg.info(f"    GRM of {n} samples from {n_used} of {m} variants", time=start)
    return _frame(A, ids)
