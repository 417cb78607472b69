"""The conditional score test: the compact null model with conditioning variants added as covariates.

At the fitted ``tau`` and ``sigma2_e`` of each gene, adding the donor-level conditioning variants ``C`` (in cells
``ZC``) to the covariates gives the projection ``P_c = P - PZC (C'Z'PZC)^-1 C'Z'P``, so the plain score test under
``P_c`` is the conditional score test (see the "Model and algorithm" page). :func:`condition` builds that model as
a :class:`~._step2.CompactNull` (rotated covariates ``[X~, C~]``, the bordered ``(X*'H^-1 X*)^-1`` and the GLS
residuals of the augmented model), so :meth:`~._step2.CompactNull.stats` computes the conditional statistics
unchanged, vectorised over genes and variants.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._step2 import VAR_RTOL, CompactNull


def condition(model: CompactNull, Ct: np.ndarray) -> tuple[CompactNull, np.ndarray]:
    """The model of every gene of ``model`` with the rotated variants ``Ct`` (donors x k, from
    :meth:`~._step2.CompactNull.rotate`, none of them zero) added to its covariates.

    Returns the conditional model and a boolean array over genes: False where the conditioning variants are
    (numerically) collinear with each other or with the covariates in that gene's metric; those genes' arrays
    are NaN, so their statistics come out NaN.
    """
    k = Ct.shape[1]
    if k == 0:
        return model, np.ones(model.n_genes, dtype=bool)
    W, C = model.W, model.C
    # per gene: T = C~'(w*C~) (k x k), Vc = X~'(w*C~) (p x k), t = C~'(w*e~) (k)
    T = np.empty((model.n_genes, k, k))
    for i in range(k):
        T[:, i, i:] = W @ (Ct[:, i : i + 1] * Ct[:, i:])
        T[:, i:, i] = T[:, i, i:]
    Vc = np.stack([(W * Ct[:, j]) @ model.Xrot for j in range(k)], axis=2)
    t = model.WR @ Ct
    CVc = np.matmul(C, Vc)
    # the Schur complement C'P_H C (in H units) and its scaled form, whose smallest eigenvalue measures collinearity
    Sch = T - np.matmul(Vc.transpose(0, 2, 1), CVc)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / np.sqrt(np.einsum("gii->gi", T))
        scaled = Sch * d[:, :, None] * d[:, None, :]
        ok = np.isfinite(scaled).all(axis=(1, 2))
        low = np.full(model.n_genes, -np.inf)
        low[ok] = np.linalg.eigvalsh(scaled[ok])[:, 0]
    ok &= low > VAR_RTOL
    Sinv = np.full_like(Sch, np.nan)
    if ok.any():
        Sinv[ok] = np.linalg.inv(Sch[ok])
    # bordered inverse of X*'H^-1 X* = [[A, Vc], [Vc', T]] with A^-1 = C
    CVcS = np.matmul(CVc, Sinv)
    p = C.shape[1]
    Cnew = np.empty((model.n_genes, p + k, p + k))
    Cnew[:, :p, :p] = C + np.matmul(CVcS, CVc.transpose(0, 2, 1))
    Cnew[:, :p, p:] = -CVcS
    Cnew[:, p:, :p] = -CVcS.transpose(0, 2, 1)
    Cnew[:, p:, p:] = Sinv
    # GLS residuals of the augmented model: e*~ = e~ + X~ C Vc gamma - C~ gamma, gamma = S^-1 C~'(w*e~)
    gamma = np.einsum("gij,gj->gi", Sinv, t)
    R = model.WR / W + np.einsum("gpk,gk->gp", CVc, gamma) @ model.Xrot.T - gamma @ Ct.T
    out = replace(model, Xrot=np.concatenate([model.Xrot, Ct], axis=1), WR=W * R, C=Cnew)
    return out, ok


def redundant(model: CompactNull, Ct: np.ndarray, gene: int = 0) -> list[int]:
    """Columns of ``Ct`` that add nothing for gene ``gene``: each one in turn is collinear (in the gene's metric)
    with the covariates and the columns before it that were kept. For error messages."""
    out: list[int] = []
    kept: list[int] = []
    single = subset(model, slice(gene, gene + 1))
    for j in range(Ct.shape[1]):
        _, ok = condition(single, Ct[:, [*kept, j]])
        if ok[0]:
            kept.append(j)
        else:
            out.append(j)
    return out


def subset(model: CompactNull, rows: np.ndarray | slice) -> CompactNull:
    """The model of the genes ``rows`` of ``model`` (positions among its genes)."""
    return replace(
        model, var_index=model.var_index[rows], W=model.W[rows], WR=model.WR[rows], s2e=model.s2e[rows], C=model.C[rows]
    )
