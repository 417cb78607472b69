"""The conditional score test: the compact null model with conditioning variants added as covariates.

At the fitted ``tau`` and ``sigma2_e`` of each gene, adding the donor-level conditioning variants ``C`` (in cells
``ZC``) to the covariates gives the projection ``P_c = P - PZC (C'Z'PZC)^-1 C'Z'P``, so the plain score test under
``P_c`` is the conditional score test (see the "Model and algorithm" page). :func:`condition` builds that model as
a :class:`~._step2.CompactNull` (rotated covariates ``[X~, C~]``, the bordered ``(X*'H^-1 X*)^-1`` and the GLS
residuals of the augmented model), so :meth:`~._step2.CompactNull.stats` computes the conditional statistics
unchanged, vectorised over genes and variants. For count fits (:class:`~._step2.CountNull`) the same holds in the
working model at the fixed null fit: ``ZC`` joins the covariates, so ``B`` gains the columns ``T D_w C``, ``A^-1``
is bordered and the donor sums of ``P y~`` lose their projection on ``Z'PZC`` (:func:`_condition_counts`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._glmm import block_solve
from ._step2 import VAR_RTOL, CompactNull, CountNull


def _bordered_inverse(Ainv: np.ndarray, AV: np.ndarray, Sinv: np.ndarray) -> np.ndarray:
    """Per gene, the inverse of ``[[A, V], [V', T]]`` from ``A^-1``, ``A^-1 V`` and the Schur complement's inverse
    ``S^-1 = (T - V'A^-1 V)^-1`` (genes first)."""
    AVS = np.matmul(AV, Sinv)
    p, k = Ainv.shape[1], Sinv.shape[1]
    out = np.empty((Ainv.shape[0], p + k, p + k))
    out[:, :p, :p] = Ainv + np.matmul(AVS, AV.transpose(0, 2, 1))
    out[:, :p, p:] = -AVS
    out[:, p:, :p] = -AVS.transpose(0, 2, 1)
    out[:, p:, p:] = Sinv
    return out


def condition(model: CompactNull | CountNull, Ct: np.ndarray) -> tuple[CompactNull | CountNull, np.ndarray]:
    """The model of every gene of ``model`` with the rotated variants ``Ct`` (donors x k, from
    :meth:`~._step2.CompactNull.rotate`, none of them zero) added to its covariates.

    Returns the conditional model and a boolean array over genes: False where the conditioning variants are
    (numerically) collinear with each other or with the covariates in that gene's metric; those genes' arrays
    are NaN, so their statistics come out NaN.
    """
    k = Ct.shape[1]
    if k == 0:
        return model, np.ones(model.n_genes, dtype=bool)
    if isinstance(model, CountNull):
        return _condition_counts(model, Ct)
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
    Sinv, ok = _schur_inverse(T, Sch)
    # bordered inverse of X*'H^-1 X* = [[A, Vc], [Vc', T]] with A^-1 = C
    Cnew = _bordered_inverse(C, CVc, Sinv)
    # GLS residuals of the augmented model: e*~ = e~ + X~ C Vc gamma - C~ gamma, gamma = S^-1 C~'(w*e~)
    gamma = np.einsum("gij,gj->gi", Sinv, t)
    R = model.WR / W + np.einsum("gpk,gk->gp", CVc, gamma) @ model.Xrot.T - gamma @ Ct.T
    out = replace(model, Xrot=np.concatenate([model.Xrot, Ct], axis=1), WR=W * R, C=Cnew)
    return out, ok


def _schur_inverse(T: np.ndarray, Sch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of each Schur complement ``Sch`` (genes x k x k) and whether it is usable: the smallest eigenvalue of
    ``Sch`` scaled by the diagonal of ``T`` (the conditioning variants' own quadratic form) measures collinearity."""
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / np.sqrt(np.einsum("gii->gi", T))
        scaled = Sch * d[:, :, None] * d[:, None, :]
        ok = np.isfinite(scaled).all(axis=(1, 2))
        low = np.full(len(Sch), -np.inf)
        low[ok] = np.linalg.eigvalsh(scaled[ok])[:, 0]
    ok &= low > VAR_RTOL
    Sinv = np.full_like(Sch, np.nan)
    if ok.any():
        Sinv[ok] = np.linalg.inv(Sch[ok])
    return Sinv, ok


def _condition_counts(model: CountNull, C: np.ndarray) -> tuple[CountNull, np.ndarray]:
    """:func:`condition` for count fits, ``C`` the (centred) conditioning genotypes, donors x k.

    With ``TDC = T D_w C`` (``Z'Sigma^-1 ZC``), ``Vc = B'C`` (``X'Sigma^-1 ZC``) and the Schur complement
    ``S = C'TDC - Vc' A^-1 Vc`` (``C'Z'PZC``): ``B* = [B, TDC]``, ``A*^-1`` the bordered inverse, and
    ``resid* = resid - F S^-1 C'resid`` with ``F = TDC - B A^-1 Vc`` (``Z'PZC``), i.e. the donor sums of ``P* y~``.
    """
    Dw, s2 = model.Dw, model.sigma2_g
    TDC = model._quad[:, :, None] * C[None]
    for grp in model._groups:
        # the blocks of related donors: T D_w C = D_w C - s2 D_w L K^-1 L' D_w C
        H = np.matmul(grp.L.transpose(0, 2, 1)[None], Dw[:, grp.idx, None] * C[grp.idx][None])
        sol = np.matmul(grp.L[None], block_solve(Dw, s2, grp, H))
        TDC[:, grp.idx] -= s2[:, None, None, None] * Dw[:, grp.idx, None] * sol
    Vc = np.matmul(model.B.transpose(0, 2, 1), C)
    T = np.einsum("nk,gnl->gkl", C, TDC)
    T = (T + T.transpose(0, 2, 1)) / 2
    AVc = np.matmul(model.Ainv, Vc)
    Sinv, ok = _schur_inverse(T, T - np.matmul(Vc.transpose(0, 2, 1), AVc))
    Anew = _bordered_inverse(model.Ainv, AVc, Sinv)
    F = TDC - np.matmul(model.B, AVc)
    gamma = np.einsum("gkl,gl->gk", Sinv, model.resid @ C)
    resid = model.resid - np.einsum("gnk,gk->gn", F, gamma)
    out = replace(model, B=np.concatenate([model.B, TDC], axis=2), Ainv=Anew, resid=resid)
    return out, ok


def redundant(model: CompactNull | CountNull, Ct: np.ndarray, gene: int = 0) -> list[int]:
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


def subset(model: CompactNull | CountNull, rows: np.ndarray | slice) -> CompactNull | CountNull:
    """The model of the genes ``rows`` of ``model`` (positions among its genes)."""
    if isinstance(model, CountNull):
        return replace(
            model, var_index=model.var_index[rows], sigma2_g=model.sigma2_g[rows], Dw=model.Dw[rows], B=model.B[rows],
            Ainv=model.Ainv[rows], resid=model.resid[rows], theta=None if model.theta is None else model.theta[rows],
        )  # fmt: skip
    return replace(
        model, var_index=model.var_index[rows], W=model.W[rows], WR=model.WR[rows], s2e=model.s2e[rows], C=model.C[rows]
    )
