"""Saddlepoint p-values of count score tests (the SPA of SAIGE / SAIGE-QTL), from the stored compact projection.

For a gene and a donor-level variant ``g`` the score ``S = g'Z'P y~`` is, conditional on the donor effects, a sum
of independent count contributions plus the donor-effect part, Gaussian in the working model. Its cumulant
generating function is built from donor-level quantities only (``f = Z'PZg``, the donor sums of the working
weights ``Dw``, the cells per donor and ``theta``) and the two tails of ``S`` come from the Lugannani-Rice
saddlepoint formula in Barndorff-Nielsen's form. The derivation and its approximation level are on the "Model and
algorithm" page (``docs/model.md``, "Saddlepoint p-values").
"""

from __future__ import annotations

import math

import numpy as np

from ._compiled import jit

#: Default |z| above which count score tests get the saddlepoint p-value (SAIGE's default).
SPA_CUTOFF = 2.0


@jit()
def projected_genotypes(genes, cols, tdw, B, Ainv, Gt, out):  # pragma: no cover - compiled
    """``out[m] = T D_w g - B Ainv B'g`` on the singleton donors' diagonal (``tdw``) for the pairs (gene
    ``genes[m]``, column ``cols[m]`` of ``Gt``); the blocks of related donors are corrected by the caller."""
    n, p = B.shape[1], B.shape[2]
    v = np.empty(p)
    c = np.empty(p)
    for m in range(genes.shape[0]):
        gi = genes[m]
        j = cols[m]
        for a in range(p):
            v[a] = 0.0
        for d in range(n):
            x = Gt[d, j]
            for a in range(p):
                v[a] += B[gi, d, a] * x
        for a in range(p):
            s = 0.0
            for b in range(p):
                s += Ainv[gi, a, b] * v[b]
            c[a] = s
        for d in range(n):
            s = tdw[gi, d] * Gt[d, j]
            for a in range(p):
                s -= B[gi, d, a] * c[a]
            out[m, d] = s


@jit()
def _cgf(t, gs, Dw, r, a, th, n_cells, vg, nb):  # pragma: no cover - compiled
    """K(t), K'(t), K''(t) of the score (see the module docstring); ``nb``: negative binomial donors."""
    K = 0.5 * vg * t * t
    K1 = vg * t
    K2 = vg
    for d in range(gs.shape[0]):
        if Dw[d] <= 0.0 or gs[d] == 0.0:
            continue
        s = t * gs[d]
        if nb:
            x = a[d] * s
            em = math.expm1(x)
            D = 1.0 - r[d] * em
            K += -n_cells[d] * th * math.log1p(-r[d] * em) - Dw[d] * s
            K1 += gs[d] * Dw[d] * em * (1.0 + r[d]) / D
            K2 += gs[d] * gs[d] * Dw[d] * a[d] * (em + 1.0) * (1.0 + r[d]) / (D * D)
        else:
            em = math.expm1(s)
            K += Dw[d] * (em - s)
            K1 += gs[d] * Dw[d] * em
            K2 += gs[d] * gs[d] * Dw[d] * (em + 1.0)
    return K, K1, K2


@jit()
def _ndtr(x):  # pragma: no cover - compiled
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@jit()
def _tail(q, gs, Dw, r, a, th, n_cells, vg, nb, tlo, thi, var):  # pragma: no cover - compiled
    """P(S >= q) for q > 0, P(S <= q) for q < 0, by the saddlepoint ``K'(t) = q`` (safeguarded Newton inside the
    domain ``(tlo, thi)``) and Barndorff-Nielsen's ``r* = w + log(u/w)/w``. NaN when it fails."""
    lo = 0.0 if q > 0 else tlo
    hi = thi if q > 0 else 0.0
    t = q / var
    if t <= lo or t >= hi:
        t = 0.5 * (lo + hi) if math.isfinite(lo) and math.isfinite(hi) else (2.0 * lo if q < 0 else 2.0 * hi)
    tol = 1e-12 * math.sqrt(var)
    K, K1, K2 = _cgf(t, gs, Dw, r, a, th, n_cells, vg, nb)
    for _ in range(200):
        diff = K1 - q
        if abs(diff) <= tol:
            break
        if diff < 0:
            lo = t
        else:
            hi = t
        step = t - diff / K2
        if not (lo < step < hi) or not math.isfinite(step):
            if math.isfinite(lo) and math.isfinite(hi):
                step = 0.5 * (lo + hi)
            elif math.isfinite(lo):
                step = lo + 2.0 * max(abs(lo), 1.0 / math.sqrt(var))
            else:
                step = hi - 2.0 * max(abs(hi), 1.0 / math.sqrt(var))
        if step == t:
            break
        t = step
        K, K1, K2 = _cgf(t, gs, Dw, r, a, th, n_cells, vg, nb)
    else:
        return np.nan
    h = t * q - K
    if not (h > 0.0 and K2 > 0.0 and math.isfinite(h)):
        return np.nan
    w = math.copysign(math.sqrt(2.0 * h), t)
    u = t * math.sqrt(K2)
    if abs(w) < 1e-8 or u / w <= 0.0:
        return np.nan
    rstar = w + math.log(u / w) / w
    return _ndtr(-rstar) if q > 0 else _ndtr(rstar)


@jit()
def spa_pvalues(F, Dw, n_cells, theta, S, var, out):  # pragma: no cover - compiled
    """Two-sided saddlepoint p-values of the pairs ``m``: ``F[m]`` (donors) is ``f = Z'PZg``, ``Dw[m]`` the gene's
    donor sums of the working weights, ``theta[m]`` its dispersion (``inf``: Poisson), ``S[m]`` and ``var[m]`` the
    score and its variance. NaN where the saddlepoint fails (the caller keeps the normal p-value)."""
    n = F.shape[1]
    gs = np.empty(n)
    r = np.empty(n)
    a = np.empty(n)
    for m in range(F.shape[0]):
        th = theta[m]
        nb = math.isfinite(th)
        v0 = 0.0
        tlo = -np.inf
        thi = np.inf
        for d in range(n):
            dw = Dw[m, d]
            gs[d] = F[m, d] / dw if dw > 0.0 else 0.0
            v0 += gs[d] * F[m, d]
            if nb and dw > 0.0:
                w = dw / n_cells[d]
                a[d] = 1.0 - w / th
                r[d] = w / (th - w)
                lim = math.log(th / w) / a[d]  # a s < log(theta / w): the NB moment generating function exists
            else:
                a[d] = 1.0
                r[d] = 0.0
                lim = 700.0  # exp(s) stays finite
            if gs[d] > 0.0:
                thi = min(thi, lim / gs[d])
            elif gs[d] < 0.0:
                tlo = max(tlo, lim / gs[d])
        vg = max(var[m] - v0, 0.0)
        q = abs(S[m])
        if not (var[m] > 0.0 and math.isfinite(q)):
            out[m] = np.nan
            continue
        up = _tail(q, gs, Dw[m], r, a, th, n_cells, vg, nb, tlo, thi, var[m])
        down = _tail(-q, gs, Dw[m], r, a, th, n_cells, vg, nb, tlo, thi, var[m])
        out[m] = min(1.0, up + down)
