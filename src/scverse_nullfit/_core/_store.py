"""Step 5 of the pipeline: write the results and the compact projection into the AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from ._design import Design, Donors, Spectral
from ._reml import GeneFits, h2_pvalue

if TYPE_CHECKING:
    from anndata import AnnData


def results_frame(var_names: pd.Index, fitted: np.ndarray, fits: GeneFits) -> pd.DataFrame:
    """The per-gene summary table over all genes; rows of genes not fitted are NaN / False."""
    G = len(var_names)

    def full(values, fill=np.nan, dtype=np.float64):
        out = np.full(G, fill, dtype=dtype)
        out[fitted] = values
        return out

    pval = h2_pvalue(fits.loglik, fits.loglik0)
    tau = fits.tau
    return pd.DataFrame(
        {
            "tau": full(tau),
            "sigma2_g": full(tau * fits.sigma2_e),
            "sigma2_e": full(fits.sigma2_e),
            "h2": full(tau / (1.0 + tau)),
            "loglik": full(fits.loglik),
            "converged": full(fits.converged, False, bool),
            "n_iter": full(fits.n_iter, 0, np.int64),
            "h2_pval": full(pval),
            "tau_se": full(fits.tau_se),
            "loglik_null": full(fits.loglik0),
        },
        index=var_names.copy(),
    )


def pack_symmetric(A: np.ndarray) -> np.ndarray:
    """The upper triangles (row by row, diagonal included) of a stack of symmetric p x p matrices, as one 2-D
    array of shape (stack, p (p + 1) / 2): 2-D arrays survive anndata's concat, transpose, h5ad and zarr."""
    rows, cols = np.triu_indices(A.shape[-1])
    return np.ascontiguousarray(A[..., rows, cols])


def unpack_symmetric(packed: np.ndarray, p: int) -> np.ndarray:
    """The stack of symmetric p x p matrices whose upper triangles :func:`pack_symmetric` packed."""
    packed = np.asarray(packed, dtype=np.float64)
    if packed.ndim == 3:  # stored unpacked by versions before 0.2
        return packed
    if packed.ndim != 2 or packed.shape[1] != p * (p + 1) // 2:
        raise ValueError(f"expected packed symmetric {p} x {p} matrices (width {p * (p + 1) // 2}), got {packed.shape}")
    rows, cols = np.triu_indices(p)
    out = np.empty((packed.shape[0], p, p))
    out[:, rows, cols] = packed
    out[:, cols, rows] = packed
    return out


def per_gene_arrays(
    n_vars: int, fitted: np.ndarray, fits: GeneFits, beta: np.ndarray, key: str
) -> dict[str, np.ndarray]:
    """The per-gene part of the compact projection by ``varm`` key, padded with NaN for genes not fitted."""
    out = {}
    packed = pack_symmetric(fits.Ainv)
    for name, values in ((Key.beta(key), beta), (Key.xhx_inv(key), packed), (Key.resid_rot(key), fits.resid)):
        if fitted.all():
            out[name] = values
            continue
        arr = np.full((n_vars, *values.shape[1:]), np.nan)
        arr[fitted] = values
        out[name] = arr
    return out


def shared_part(donors: Donors, design: Design, spectral: Spectral, params: dict) -> dict:
    """The part of the compact projection shared by all genes, plus the call's parameters."""
    return {
        Key.PARAMS: params,
        "donors": np.asarray(donors.ids, dtype=object),
        "cells_per_donor": donors.counts.astype(np.int64),
        "eigenvalues": spectral.lam,
        "eigenvectors": spectral.U,
        "covariates_rotated": spectral.Xrot,
        "covariate_names": np.asarray(design.names, dtype=object),
        "dropped_covariates": np.asarray(design.dropped, dtype=object),
        "n_cells": int(spectral.n_cells),
    }


def store(adata: AnnData, key: str, table: pd.DataFrame, arrays: dict[str, np.ndarray], shared: dict) -> None:
    """Write everything at once (nothing is written before all of it has been computed)."""
    adata.varm[key] = table
    for name, arr in arrays.items():
        adata.varm[name] = arr
    adata.uns[key] = shared


#: Columns of ``varm[key]`` for the count families: the Gaussian columns (``tau``, ``sigma2_e``, ``h2``, ``tau_se``
def count_results_frame(var_names: pd.Index, fitted: np.ndarray, fits) -> pd.DataFrame:
    """The per-gene table of a count fit (``fits``: :class:`._glmm.CountFits` of the genes ``fitted``)."""
    G = len(var_names)

    def full(values, fill=np.nan, dtype=np.float64):
        out = np.full(G, fill, dtype=dtype)
        out[fitted] = values
        return out

    nan = np.full(int(fitted.sum()), np.nan)
    return pd.DataFrame(
        {
            "tau": full(nan),
            "sigma2_g": full(fits.sigma2_g),
            "sigma2_e": full(nan),
            "h2": full(nan),
            "loglik": full(fits.loglik),
            "converged": full(fits.converged, False, bool),
            "n_iter": full(fits.n_iter, 0, np.int64),
            "h2_pval": full(fits.pval),
            "tau_se": full(nan),
            "loglik_null": full(fits.loglik0),
            "theta": full(fits.theta),
            "sigma2_g_se": full(fits.sigma2_g_se),
            "boundary": full(fits.boundary, False, bool),
        },
        index=var_names.copy(),
    )


def blocks_part(blocks) -> dict:
    """A count fit's donor covariance blocks (:class:`._glmm.DonorBlocks`) for ``uns[key][Key.GRM_BLOCKS]``."""
    return {"ptr": blocks.ptr, "donors": blocks.donors, "L": blocks.L, "loff": blocks.loff}
