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


def per_gene_arrays(
    n_vars: int, fitted: np.ndarray, fits: GeneFits, beta: np.ndarray, key: str
) -> dict[str, np.ndarray]:
    """The per-gene part of the compact projection by ``varm`` key, padded with NaN for genes not fitted."""
    out = {}
    for name, values in ((Key.beta(key), beta), (Key.xhx_inv(key), fits.Ainv), (Key.resid_rot(key), fits.resid)):
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
