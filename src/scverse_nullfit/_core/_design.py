"""Step 2 of the pipeline: validation, donor mapping, the design matrix and the stage-1 spectral precompute."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import linalg, sparse

from .._utils import preview

#: Relative tolerance on the diagonal of R (QR of the design) below which a column counts as collinear.
RANK_TOL = 1e-8
#: Elements per block of rows in the QR of the design (:func:`full_rank_columns`).
QR_BLOCK_ELEMENTS = 1 << 17
#: Eigenvalues of D^1/2 G D^1/2 below ``-NEG_EIG_TOL * max(eigenvalue)`` are reported as clearly negative.
NEG_EIG_TOL = 1e-6
#: A GRM whose smallest eigenvalue is below ``-GRM_NEG_EIG_RTOL`` times its largest is an error, not rounding.
GRM_NEG_EIG_RTOL = 0.1
#: Relative tolerance for the GRM's symmetry check.
SYM_TOL = 1e-6


@dataclass
class Donors:
    """Cell-to-donor mapping in model order."""

    ids: np.ndarray  #: donor IDs (str), in model order
    codes: np.ndarray  #: (cells,) int index of each cell's donor
    counts: np.ndarray  #: (donors,) cells per donor, float64


def donor_labels(obs: pd.DataFrame, donor_key: str) -> np.ndarray:
    """The donor ID of every cell, as strings, with missing IDs rejected."""
    if donor_key not in obs.columns:
        raise KeyError(f"donor_key {donor_key!r} is not a column of adata.obs (columns: {list(obs.columns)}).")
    labels = obs[donor_key]
    missing = labels.isna().to_numpy()
    if missing.any():
        raise ValueError(f"obs[{donor_key!r}] has {int(missing.sum())} cells with a missing donor ID.")
    return labels.astype(str).to_numpy()


def align_grm(grm: pd.DataFrame, labels: np.ndarray, source: str) -> tuple[np.ndarray, Donors]:
    """Check the GRM, keep the donors that have cells and order everything by the GRM's order.

    Returns the donor-level GRM ``G`` (donors x donors) and the donor mapping.
    """
    if not isinstance(grm, pd.DataFrame):
        raise ValueError(f"GRM from {source} must be a DataFrame, not {type(grm).__name__}.")
    if grm.shape[0] != grm.shape[1]:
        raise ValueError(f"GRM from {source} is not square: shape {grm.shape}.")
    index = grm.index.astype(str)
    columns = grm.columns.astype(str)
    if not index.equals(columns):
        raise ValueError(
            f"GRM from {source}: its row IDs and column IDs differ (first rows {list(index[:3])}, "
            f"first columns {list(columns[:3])}); it must be indexed and columned by the same donor IDs."
        )
    if index.has_duplicates:
        raise ValueError(f"GRM from {source} has duplicated donor IDs: {preview(index[index.duplicated()].unique())}.")
    values = grm.to_numpy(dtype=np.float64, copy=False)
    if not np.isfinite(values).all():
        bad = index[~np.isfinite(values).all(axis=1)]
        raise ValueError(f"GRM from {source} has NaN or infinite entries in the rows of donors {preview(bad)}.")
    scale = max(values.max(), -values.min(), 1e-300)
    sym = (values + values.T) / 2
    asym = 2.0 * max((values - sym).max(), (sym - values).max())  # max |G - G'| without a second transposed pass
    if asym > SYM_TOL * scale:
        i, j = np.unravel_index(np.argmax(np.abs(values - values.T)), values.shape)
        raise ValueError(
            f"GRM from {source} is not symmetric: entry ({index[i]!r}, {index[j]!r}) differs from its transpose "
            f"by {asym:.3g}."
        )

    uniq = pd.unique(labels)
    missing = pd.Index(uniq).difference(index, sort=False)
    if len(missing):
        raise ValueError(
            f"donors with cells but not in the GRM from {source}: {preview(missing)} "
            f"(the GRM's donor IDs look like {preview(index[:3])})."
        )

    keep = np.flatnonzero(index.isin(uniq))
    ids = index[keep].to_numpy().astype(str)
    G = sym if len(keep) == len(index) else sym[np.ix_(keep, keep)]
    codes = pd.Index(ids).get_indexer(labels).astype(np.int64)
    counts = np.bincount(codes, minlength=len(ids)).astype(np.float64)
    return G, Donors(ids=ids, codes=codes, counts=counts)


def as_list(columns: str | Sequence[str] | None) -> list[str]:
    """A column argument (one name, several, or None) as a list of names."""
    if columns is None:
        return []
    return [columns] if isinstance(columns, str) else list(columns)


@dataclass
class Design:
    """The fixed-effects design matrix after rank reduction."""

    X: np.ndarray  #: (cells, p) float64, intercept first
    names: list[str]  #: column names, matching X
    dropped: list[str]  #: columns dropped as collinear or constant


def _encode(obs: pd.DataFrame, col: str) -> tuple[np.ndarray, list[str]]:
    s = obs[col]
    if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        if s.isna().any():
            raise ValueError(f"covariate {col!r} has {int(s.isna().sum())} missing values.")
        cat = s.astype("category") if not isinstance(s.dtype, pd.CategoricalDtype) else s
        cat = cat.cat.remove_unused_categories()
        levels = list(cat.cat.categories)
        codes = cat.cat.codes.to_numpy()
        if len(levels) < 2:
            return np.zeros((len(s), 1)), [f"{col}[{levels[0] if levels else ''}]"]
        onehot = (codes[:, None] == np.arange(1, len(levels))[None, :]).astype(np.float64)
        return onehot, [f"{col}[{lev}]" for lev in levels[1:]]
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64)[:, None], [col]
    if not pd.api.types.is_numeric_dtype(s.dtype):
        raise ValueError(f"covariate {col!r} has unsupported dtype {s.dtype}; use numbers or categories.")
    values = s.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"covariate {col!r} has {int(bad.sum())} NaN or infinite values.")
    return values[:, None], [col]


def build_design(
    obs: pd.DataFrame,
    covariates: Sequence[str],
    donor_covariates: Sequence[str] | None,
    donors: Donors,
) -> Design:
    """Intercept + covariates (categoricals one-hot, first level dropped), checked and reduced to full rank."""
    covariates, donor_covariates = as_list(covariates), as_list(donor_covariates)
    for col in [*covariates, *donor_covariates]:
        if col not in obs.columns:
            raise KeyError(f"covariate {col!r} is not a column of adata.obs.")
    dup = pd.Index(covariates)[pd.Index(covariates).duplicated()]
    if len(dup):
        raise ValueError(f"covariates lists {list(dup)} more than once.")
    columns = covariates + [c for c in donor_covariates if c not in covariates]

    blocks, names = [np.ones((len(obs), 1))], ["intercept"]
    for col in columns:
        values, col_names = _encode(obs, col)
        blocks.append(values)
        names.extend(col_names)
        if col in donor_covariates:
            _check_constant_within_donor(obs[col], values, col, donors)
    X = np.hstack(blocks)

    keep = full_rank_columns(X)
    dropped = [n for n, k in zip(names, keep, strict=True) if not k]
    if dropped:
        warnings.warn(
            f"dropping design columns that are constant or collinear with earlier ones: {dropped}.",
            UserWarning,
            stacklevel=3,
        )
    kept = [n for n, k in zip(names, keep, strict=True) if k]
    return Design(X=np.ascontiguousarray(X[:, keep]), names=kept, dropped=dropped)


def _check_constant_within_donor(series: pd.Series, values: np.ndarray, col: str, donors: Donors) -> None:
    n = len(donors.ids)
    for j in range(values.shape[1]):
        v = values[:, j]
        lo = np.full(n, np.inf)
        hi = np.full(n, -np.inf)
        np.minimum.at(lo, donors.codes, v)
        np.maximum.at(hi, donors.codes, v)
        varying = np.flatnonzero(hi - lo > 1e-12 * np.maximum(1.0, np.abs(hi)))
        if len(varying):
            raise ValueError(
                f"donor covariate {col!r} varies within donors {preview(donors.ids[varying])}; "
                "a donor covariate must be constant within each donor."
            )


def full_rank_columns(X: np.ndarray) -> np.ndarray:
    """Boolean mask of the columns kept greedily, in order, such that the kept ones have full rank.

    One QR of X gives R with R'R = X'X (by blocks of rows, whose R factors are stacked and factored again: the same R
    up to signs and rounding, with each block's passes in cache); the greedy selection then works on R's p columns
    only.
    """
    p = X.shape[1]
    rows = max(QR_BLOCK_ELEMENTS // max(p, 1), 2 * p)
    if len(X) > 2 * rows:
        X = np.vstack([linalg.qr(X[a : a + rows], mode="r", check_finite=False)[0][:p] for a in range(0, len(X), rows)])
    R = linalg.qr(X, mode="r", check_finite=False)[0][:p]
    norms = np.sqrt(np.einsum("ij,ij->j", R, R))
    keep = np.zeros(p, dtype=bool)
    for j in range(p):
        if norms[j] == 0:
            continue
        cols = [*np.flatnonzero(keep), j]
        Rj = linalg.qr(R[:, cols], mode="r", check_finite=False)[0]
        keep[j] = abs(Rj[len(cols) - 1, len(cols) - 1]) > RANK_TOL * norms[j]
    return keep


@dataclass
class Spectral:
    """Stage 1: everything shared by all genes."""

    lam: np.ndarray  #: (donors,) eigenvalues of D^1/2 G D^1/2, clipped at 0
    U: np.ndarray  #: (donors, donors) eigenvectors
    ZtX: np.ndarray  #: (donors, p) donor sums of the covariates Z'X
    Xrot: np.ndarray  #: (donors, p) rotated covariates U' D^-1/2 Z'X
    XtX: np.ndarray  #: (p, p)
    Aw: np.ndarray  #: (p, p) within-donor cross-products X'X - Xrot'Xrot
    n_cells: int


def eigh_or_error(M: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a symmetric matrix; a LAPACK failure becomes a ValueError that says what failed.

    numpy's ``eigh`` (LAPACK ``syevd``, as scipy's ``driver="evd"``) releases the GIL, so the pass over the expression
    runs while it works (scipy's wrapper holds the GIL throughout)."""
    try:
        return np.linalg.eigh(M)
    except (np.linalg.LinAlgError, ValueError) as err:
        raise ValueError(f"the eigendecomposition of {what} failed ({err}); check the GRM for extreme values.") from err


def check_grm_negativity(G: np.ndarray) -> None:
    """Clip-or-fail decision for a GRM that is not positive semi-definite (called only when it is not).

    By Sylvester's law of inertia the scaled matrix ``D^1/2 G D^1/2`` has negative eigenvalues exactly when ``G``
    has; the tolerance is judged on ``G``'s own extreme eigenvalues, so the message speaks of the GRM the user
    passed. Below ``-GRM_NEG_EIG_RTOL`` times the largest eigenvalue is an error; above, a warning.
    """
    n = G.shape[0]
    try:
        low = linalg.eigh(G, eigvals_only=True, subset_by_index=[0, 0], check_finite=False)[0]
        high = linalg.eigh(G, eigvals_only=True, subset_by_index=[n - 1, n - 1], check_finite=False)[0]
    except (np.linalg.LinAlgError, ValueError) as err:
        raise ValueError(f"the eigendecomposition of the GRM failed ({err}); check it for extreme values.") from err
    if low < -GRM_NEG_EIG_RTOL * max(high, 1e-300):
        raise ValueError(
            f"the GRM is far from positive semi-definite: its smallest eigenvalue is {low:.3g} and its largest "
            f"{high:.3g} (more negative than -{GRM_NEG_EIG_RTOL:g} x the largest is not rounding error). Check that "
            "the file, its donor IDs and its scaling are right."
        )
    warnings.warn(
        f"the GRM is not positive semi-definite: its smallest eigenvalue is {low:.3g} (largest {high:.3g}); "
        "negative eigenvalues are set to 0.",
        UserWarning,
        stacklevel=4,
    )


@dataclass
class DesignSums:
    """The design's sums over cells, which need no eigendecomposition (the OLS pre-residuals use only these)."""

    ZtX: np.ndarray  #: (donors, p) donor sums of the covariates Z'X
    XtX: np.ndarray  #: (p, p)
    Aw: np.ndarray  #: (p, p) within-donor cross-products
    n_cells: int


def design_sums(donors: Donors, X: np.ndarray) -> DesignSums:
    """``Z'X``, ``X'X`` and the within-donor cross-products of the design."""
    ZtX = donor_sums(X, donors)
    means = ZtX / donors.counts[:, None]
    Aw = np.zeros((X.shape[1], X.shape[1]))
    for a in range(0, X.shape[0], 1 << 16):  # blocks of cells: no cells x p temporaries
        Xw = X[a : a + (1 << 16)] - means[donors.codes[a : a + (1 << 16)]]
        Aw += Xw.T @ Xw
    return DesignSums(ZtX=ZtX, XtX=X.T @ X, Aw=(Aw + Aw.T) / 2, n_cells=X.shape[0])


def spectral_precompute(G: np.ndarray, donors: Donors, X: np.ndarray, *, sums: DesignSums | None = None) -> Spectral:
    """Eigendecompose D^1/2 G D^1/2 and rotate the covariates' donor sums (``sums``: the design's, if computed)."""
    sqrt_c = np.sqrt(donors.counts)
    M = G * sqrt_c[:, None] * sqrt_c[None, :]
    lam, U = eigh_or_error(M, "D^1/2 G D^1/2 (the GRM scaled by cells per donor)")
    top = max(lam.max(initial=0.0), 1e-300)
    if lam.min(initial=0.0) < -NEG_EIG_TOL * top:
        check_grm_negativity(G)
    lam = np.clip(lam, 0.0, None)
    sums = design_sums(donors, X) if sums is None else sums
    Xrot = U.T @ (sums.ZtX / sqrt_c[:, None])
    return Spectral(lam=lam, U=U, ZtX=sums.ZtX, Xrot=Xrot, XtX=sums.XtX, Aw=sums.Aw, n_cells=sums.n_cells)


def incidence(codes: np.ndarray, n_donors: int) -> sparse.csr_matrix:
    """Z' as a sparse (donors, cells) matrix."""
    n = len(codes)
    return sparse.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_donors, n))


def donor_sums(values: np.ndarray, donors: Donors) -> np.ndarray:
    """Z' values for a dense (cells, k) array."""
    return np.asarray(incidence(donors.codes, len(donors.ids)) @ values)
