"""False discovery rates across genes: Benjamini-Hochberg and Storey's q-values (the maths is on the "Model and
algorithm" page: gene-level FDR)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import interpolate, optimize

#: The qvalue package's default grid of lambda for Storey's pi0.
LAMBDAS = np.round(np.arange(0.05, 0.951, 0.05), 10)
#: Degrees of freedom of the smoothing spline through pi0(lambda) (qvalue's ``smooth.df``).
SMOOTH_DF = 3.0
#: FDR methods :func:`qvalues` accepts.
METHODS = ("storey", "storey_bootstrap", "bh")


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values ``min_{j >= i} min(1, m p_(j) / j)`` of the finite entries of ``p``
    (``m`` of them); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    x = p[ok]
    order = np.argsort(x, kind="mergesort")
    ranked = x[order] * m / np.arange(1, m + 1)
    adj = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    q = np.empty(m)
    q[order] = adj
    out[ok] = q
    return out


def pi0_lambda(p: np.ndarray, lambdas: np.ndarray = LAMBDAS) -> np.ndarray:
    """Storey's ``pi0(lambda) = #{p >= lambda} / (m (1 - lambda))`` over the finite p-values, for each lambda."""
    x = np.asarray(p, dtype=np.float64)
    x = x[np.isfinite(x)]
    lambdas = np.asarray(lambdas, dtype=np.float64)
    return (x[None, :] >= lambdas[:, None]).mean(axis=1) / (1.0 - lambdas)


def smoother_trace(x: np.ndarray, lam: float) -> float:
    """Trace of the smoother matrix of the cubic smoothing spline with penalty ``lam`` at the points ``x``."""
    eye = np.eye(len(x))
    return float(sum(interpolate.make_smoothing_spline(x, eye[i], lam=lam)(x[i]) for i in range(len(x))))


def smooth_df(x: np.ndarray, y: np.ndarray, df: float = SMOOTH_DF) -> np.ndarray:
    """The cubic smoothing spline through ``(x, y)`` with ``df`` equivalent degrees of freedom (the trace of its
    smoother matrix, as R's ``smooth.spline(x, y, df=df)``), evaluated at ``x``."""
    x = np.asarray(x, dtype=np.float64)
    return interpolate.make_smoothing_spline(x, y, lam=_penalty(tuple(x), float(df)))(x)


@lru_cache(maxsize=8)
def _penalty(x: tuple[float, ...], df: float) -> float:
    """The penalty whose smoothing spline at ``x`` has ``df`` degrees of freedom (depends on ``x`` only)."""
    xs = np.asarray(x)
    return float(np.exp(optimize.brentq(lambda s: smoother_trace(xs, np.exp(s)) - df, -30.0, 30.0, xtol=1e-10)))


def pi0_storey(p: np.ndarray, method: str = "smoother", lambdas: np.ndarray = LAMBDAS) -> float:
    """Storey's estimate of the proportion of true null hypotheses among the finite p-values.

    ``method="smoother"`` (the qvalue package's default): a cubic smoothing spline with 3 degrees of freedom
    through ``pi0(lambda)`` over ``lambdas``, evaluated at the largest lambda. ``"bootstrap"``: the
    ``pi0(lambda)`` minimising the estimated mean squared error
    ``W (1 - W/m) / (m (1 - lambda))^2 + (pi0(lambda) - q10)^2`` (``W = #{p >= lambda}``, ``q10`` the 10%
    quantile of the ``pi0(lambda)``; qvalue's closed form). Capped at 1; an estimate that is not positive (almost
    every p-value small) or not finite is returned as 1 (Benjamini-Hochberg).
    """
    x = np.asarray(p, dtype=np.float64)
    x = x[np.isfinite(x)]
    m = len(x)
    if m == 0:
        return 1.0
    lambdas = np.asarray(lambdas, dtype=np.float64)
    pi0 = pi0_lambda(x, lambdas)
    if len(lambdas) == 1:
        est = pi0[0]
    elif method == "smoother":
        if len(lambdas) < 4:
            raise ValueError("the smoother method needs at least 4 values of lambda.")
        est = smooth_df(lambdas, pi0)[-1]
    elif method == "bootstrap":
        q10 = np.quantile(pi0, 0.1)
        W = (x[None, :] >= lambdas[:, None]).sum(axis=1)
        mse = W / (m**2 * (1.0 - lambdas) ** 2) * (1.0 - W / m) + (pi0 - q10) ** 2
        est = pi0[mse == mse.min()].min()
    else:
        raise ValueError(f"unknown pi0 method {method!r}: 'smoother' or 'bootstrap'.")
    if not (np.isfinite(est) and est > 0):
        return 1.0
    return float(min(est, 1.0))


def qvalues(p: np.ndarray, method: str = "storey") -> tuple[np.ndarray, float]:
    """q-values of the finite entries of ``p`` (NaN stays NaN) and the ``pi0`` used.

    ``"storey"``: ``pi0 * BH`` with :func:`pi0_storey`'s smoother estimate (qvalue's ``qvalue(p)``);
    ``"storey_bootstrap"``: likewise with the bootstrap estimate; ``"bh"``: Benjamini-Hochberg (``pi0 = 1``).
    """
    if method == "bh":
        pi0 = 1.0
    elif method == "storey":
        pi0 = pi0_storey(p, "smoother")
    elif method == "storey_bootstrap":
        pi0 = pi0_storey(p, "bootstrap")
    else:
        raise ValueError(f"fdr_method must be one of {list(METHODS)}, not {method!r}.")
    return pi0 * bh(p), pi0
