"""GRM helpers for the tools: :func:`scverse_nullfit.tl.sparsify_grm`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._core._glmm import donor_blocks
from .._core._glmm import sparsify_grm as _sparsify


def sparsify_grm(grm: pd.DataFrame, cutoff: float = 0.05) -> pd.DataFrame:
    """Set relatedness below ``cutoff`` to zero, so that a dense GRM becomes blocks of related donors.

    Off-diagonal entries with ``|G_ij| < cutoff`` become 0 (the diagonal is kept). With
    ``fit_null(family="poisson" | "negative_binomial")`` the donors then fall into independent blocks (families),
    and the fit works block by block, which is much faster than with a dense GRM. This is the user's modelling
    choice, as with SAIGE-QTL's sparse GRM: donors less related than ``cutoff`` are treated as unrelated, and the
    result is a different model, not an approximation of the one with the dense GRM. The sparsified matrix may
    not be positive semi-definite; the fit clips its negative eigenvalues with a warning.

    Parameters
    ----------
    grm
        A GRM indexed and columned by donor ID.
    cutoff
        Relatedness below which an entry is set to 0 (e.g. 0.05 keeps relatives up to about the fourth degree).

    Returns
    -------
    The sparsified GRM (same index and columns), with ``attrs["blocks"]`` the sizes of its blocks of related
    donors, largest first.
    """
    if not isinstance(grm, pd.DataFrame):
        raise ValueError(f"grm must be a DataFrame indexed and columned by donor ID, not {type(grm).__name__}.")
    values = grm.to_numpy(dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"grm must be square, not shape {values.shape}.")
    out = pd.DataFrame(_sparsify(values, float(cutoff)), index=grm.index.copy(), columns=grm.columns.copy())
    sizes = np.sort(donor_blocks(out.to_numpy(), name="the sparsified GRM").sizes)[::-1]
    out.attrs["blocks"] = sizes.tolist()
    return out
