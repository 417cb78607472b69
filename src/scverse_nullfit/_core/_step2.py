"""The step-2 engine on arrays: the compact null model, variant rotation and chunked score statistics.

Everything comes from the compact projection that :func:`~scverse_nullfit.tl.fit_null` stores (see the "Model
and algorithm" page of the docs); no expression data and no cells x cells matrix are needed. The orchestration
(reading the stored model and the genotypes, thread limit, progress, result tables) is in ``tl/_step2.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from . import _spa
from ._compiled import jit
from ._glmm import CHUNK_ELEMENTS, DonorBlocks, _split_blocks, block_quad, block_solve

#: Target number of float64 elements of one genes x covariates x variants block (bounds the memory of a chunk).
BLOCK_ELEMENTS = 1 << 23
#: A variant whose score variance is below this fraction of ``g~'(w*g~)`` is indistinguishable from the
#: covariates (or monomorphic) for that gene: its results are NaN.
VAR_RTOL = 1e-9


def _zero_columns(Gt: np.ndarray, poly: np.ndarray | None) -> np.ndarray:
    """``Gt`` with the columns where ``poly`` is False set to exact zeros (their statistics come out NaN)."""
    if poly is not None and not poly.all():
        Gt[:, ~poly] = 0.0
    return Gt


class _NullModel:
    """What the compact null models of every family share (genes, donors, centring, raw dosages)."""

    @property
    def n_genes(self) -> int:
        return len(self.var_index)

    @property
    def n_donors(self) -> int:
        return len(self.donors)

    def _centred(self, G: np.ndarray) -> np.ndarray:
        """``G`` centred by its cell-weighted mean when the design has an intercept (exact: ``Z(g - m)`` differs
        from ``Zg`` by a multiple of the intercept column, which the projection annihilates)."""
        return G - (self.counts @ G) / self.counts.sum() if self.centre else G

    def variant_chunk(self, n_genes: int | None = None) -> int:
        """Variants per chunk so that the genes x variants outputs and a gene chunk's covariates x variants
        block stay near ``BLOCK_ELEMENTS`` each."""
        g = max(1, self.n_genes if n_genes is None else n_genes)
        n, p = self.shape
        per_variant = 2 * g + 2 * min(g, self.gene_chunk()) * p + 3 * n
        return int(max(1, min(BLOCK_ELEMENTS // per_variant, 1 << 16)))

    def pvalues(
        self, Gt: np.ndarray, S: np.ndarray, Var: np.ndarray, rows: np.ndarray | slice = slice(None)
    ) -> np.ndarray:
        """Two-sided p-values of the statistics ``S``, ``Var`` from :meth:`stats` (same ``Gt`` and ``rows``): the
        standard normal's (count models override this with saddlepoint p-values in the tails)."""
        return normal_pvalues(S, Var)

    def rotate_dosages(self, G: np.ndarray) -> np.ndarray:
        """``rotate`` of raw dosages (donors x variants, model order, NaN where missing), after :func:`impute`."""
        G, poly = impute(G)
        return self.rotate(G, poly)


@dataclass
class CompactNull(_NullModel):
    """The compact projection of the fitted genes, ready for score tests.

    Arrays over genes cover only the usable (fitted) genes among those requested; ``var_index`` maps them back
    to ``adata.var_names``. Built by :meth:`from_arrays`, so a later variant of the model (e.g. one whose covariates
    include conditioning variants) reuses :meth:`rotate` and :meth:`stats` unchanged.
    """

    var_index: np.ndarray  #: (genes,) positions of the usable genes in adata.var_names
    donors: pd.Index  #: donor IDs in model order
    counts: np.ndarray  #: (donors,) cells per donor
    U: np.ndarray  #: (donors, donors) eigenvectors of D^1/2 G D^1/2
    Xrot: np.ndarray  #: (donors, p) rotated covariates X~
    centre: bool  #: the design has an intercept, so variants may be centred (exact, better conditioned)
    W: np.ndarray  #: (genes, donors) w = 1 / (1 + tau * lam)
    WR: np.ndarray  #: (genes, donors) w * r~
    s2e: np.ndarray  #: (genes,) sigma2_e
    C: np.ndarray  #: (genes, p, p) (X'H^-1 X)^-1

    @classmethod
    def from_arrays(
        cls,
        var_index: np.ndarray,
        donors: pd.Index,
        counts: np.ndarray,
        lam: np.ndarray,
        U: np.ndarray,
        Xrot: np.ndarray,
        covariate_names: list[str],
        tau: np.ndarray,
        s2e: np.ndarray,
        C: np.ndarray,
        R: np.ndarray,
    ) -> CompactNull:
        """The model of the genes ``var_index`` from their ``tau``, ``sigma2_e``, ``(X'H^-1 X)^-1`` and rotated
        residuals ``r~`` (arrays over those genes) and the shared donor-level part."""
        W = 1.0 / (1.0 + tau[:, None] * lam[None, :])
        return cls(
            var_index=var_index,
            donors=donors,
            counts=counts,
            U=U,
            Xrot=Xrot,
            centre="intercept" in covariate_names,
            W=W,
            WR=W * R,
            s2e=s2e,
            C=np.ascontiguousarray(C),
        )

    def rotate(self, G: np.ndarray, poly: np.ndarray | None = None) -> np.ndarray:
        """``g~ = U' D^1/2 g`` of every column of ``G`` (donors x variants, model order, no missing values).

        With an intercept in the design each variant is first centred by its cell-weighted mean: ``Z(g - m)``
        differs from ``Zg`` by a multiple of the intercept column, which leaves score and variance unchanged.
        Columns where ``poly`` is False (monomorphic variants) are returned as exact zeros, so that their
        results come out NaN.
        """
        return _zero_columns(self.U.T @ (np.sqrt(self.counts)[:, None] * self._centred(G)), poly)

    def gene_chunk(self) -> int:
        """Genes per chunk so that the weighted covariates ``w * X~`` of a chunk stay near ``BLOCK_ELEMENTS``."""
        n, p = self.Xrot.shape
        return int(max(1, BLOCK_ELEMENTS // max(1, n * p)))

    def stats(
        self, Gt: np.ndarray, rows: np.ndarray | slice = slice(None), Gt2: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and its variance, (genes x variants), for the genes ``rows`` and rotated variants ``Gt``.

        ``S = g~'(w*r~)/s2e`` and ``Var = [g~'(w*g~) - v'Cv]/s2e`` with ``v = X~'(w*g~)``. For a chunk of genes,
        the scores and all genes' ``u = L'v`` (``C = LL'``, so ``v'Cv = |u|^2``) come from one GEMM of the
        stacked ``(w*r~)'`` and ``L'(w * X~)'`` (genes*(p+1) x donors) with ``g~``, and ``g~'(w*g~)`` from
        ``W @ g~^2``. Genes at ``tau = 0`` (``w = 1``) share ``v = X~'g~`` and ``g~'g~``, computed once, so they
        cost the score GEMM and the quadratic form only. Entries whose variance is not
        clearly positive (monomorphic variants, variants collinear with the covariates) are NaN. ``Gt2`` is
        ``Gt * Gt`` when the caller has it (repeated scans of the same variants).
        """
        idx = np.arange(self.n_genes)[rows]
        n, V = Gt.shape
        p = self.Xrot.shape[1]
        XrotT = np.ascontiguousarray(self.Xrot.T)
        if Gt2 is None:
            Gt2 = Gt * Gt
        S = np.empty((len(idx), V))
        Var = np.empty((len(idx), V))
        # genes at tau = 0 have w = 1: their v = X~'g~ and g~'g~ are shared, leaving one GEMM (the scores) per gene
        flat = (self.W[idx] == 1.0).all(axis=1)
        step = self.gene_chunk()
        if flat.any():
            v0 = XrotT @ Gt
            a0 = Gt2.sum(axis=0)[None, :]
            rest = np.flatnonzero(flat)
            for g0 in range(0, len(rest), step):
                out = rest[g0 : g0 + step]
                r, s2e = idx[out], self.s2e[idx[out]][:, None]
                var_h = a0 - np.einsum("pv,gpv->gv", v0, np.matmul(self.C[r], v0[None]))
                ok = var_h > VAR_RTOL * a0
                S[out] = np.where(ok, (self.WR[r] @ Gt) / s2e, np.nan)
                Var[out] = np.where(ok, var_h, np.nan) / s2e
        rest = np.flatnonzero(~flat)
        for g0 in range(0, len(rest), step):
            out = rest[g0 : g0 + step]
            r = idx[out]
            W, s2e, k = self.W[r], self.s2e[r][:, None], len(r)
            # one GEMM for the scores and u = L'v (C = LL', so v'Cv = |u|^2): rows (w*r~)' of the genes, then
            # L'(w*X~)' stacked over genes
            LX = np.matmul(_sqrt_factor(self.C[r]).transpose(0, 2, 1), XrotT[None, :, :]) * W[:, None, :]
            B = np.concatenate([self.WR[r], LX.reshape(k * p, n)]) @ Gt
            score = B[:k] / s2e
            u = B[k:].reshape(k, p, V)
            a = W @ Gt2
            var_h = a - np.einsum("gpv,gpv->gv", u, u)
            ok = var_h > VAR_RTOL * a
            S[out] = np.where(ok, score, np.nan)
            Var[out] = np.where(ok, var_h, np.nan) / s2e
        return S, Var

    @property
    def shape(self) -> tuple[int, int]:
        """(donors, design columns)."""
        return self.Xrot.shape


def _sqrt_factor(C: np.ndarray) -> np.ndarray:
    """``L`` with ``C = L L'`` for each positive semi-definite ``C`` of a stack (from its eigendecomposition, so
    a singular ``C``, the pseudo-inverse of a rank-deficient ``X'H^-1 X``, is fine)."""
    e, Q = np.linalg.eigh(C)
    return Q * np.sqrt(np.clip(e, 0.0, None))[:, None, :]


@dataclass
class CountNull(_NullModel):
    """The compact working-model projection of count fits (Poisson / negative binomial), ready for score tests.

    The same interface as :class:`CompactNull`. For a donor-level genotype ``g`` the score is ``g' resid`` and
    its variance ``g'T D_w g - (B'g)' Ainv (B'g)`` (see the "Model and algorithm" page); ``g'T D_w g`` is
    diagonal for unrelated donors and is rebuilt from ``Dw`` for blocks of related donors (batched over genes and
    blocks of a size, :func:`~._glmm.block_quad`).
    """

    var_index: np.ndarray  #: (genes,) positions of the usable genes in adata.var_names
    donors: pd.Index
    counts: np.ndarray  #: (donors,) cells per donor
    centre: bool
    sigma2_g: np.ndarray  #: (genes,)
    Dw: np.ndarray  #: (genes, donors)
    B: np.ndarray  #: (genes, donors, p)
    Ainv: np.ndarray  #: (genes, p, p)
    resid: np.ndarray  #: (genes, donors)
    blocks: DonorBlocks
    theta: np.ndarray | None = None  #: (genes,) NB2 dispersion; None or NaN: Poisson
    spa_cutoff: float | None = None  #: |z| above which :meth:`pvalues` gives saddlepoint p-values (None: never)

    def __post_init__(self):
        d1, g1, self._groups = _split_blocks(self.blocks)
        s2 = self.sigma2_g[:, None]
        self._quad = self.Dw.copy()  # the diagonal part of T D_w; multi-donor blocks are corrected in stats()
        self._quad[:, d1] = self.Dw[:, d1] / (1.0 + s2 * g1 * self.Dw[:, d1])

    def rotate(self, G: np.ndarray, poly: np.ndarray | None = None) -> np.ndarray:
        """The genotypes themselves (no rotation), centred by their cell-weighted mean when the design has an
        intercept (exact: ``P`` annihilates the intercept); monomorphic columns become exact zeros."""
        return _zero_columns(np.array(self._centred(G), dtype=np.float64), poly)

    def gene_chunk(self) -> int:
        n, p = self.B.shape[1:]
        return int(max(1, BLOCK_ELEMENTS // max(1, n * (p + 1))))

    @property
    def shape(self) -> tuple[int, int]:
        """(donors, design columns)."""
        return self.B.shape[1:]

    def stats(
        self, Gt: np.ndarray, rows: np.ndarray | slice = slice(None), Gt2: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and variance (genes x variants) of the genes ``rows`` for the genotypes ``Gt`` from :meth:`rotate`
        (``Gt2`` is ``Gt * Gt`` when the caller has it)."""
        idx = np.arange(self.n_genes)[rows]
        n, V = Gt.shape
        p = self.B.shape[2]
        Gt2 = Gt * Gt if Gt2 is None else Gt2
        S = np.empty((len(idx), V))
        Var = np.empty((len(idx), V))
        step = self.gene_chunk()
        for g0 in range(0, len(idx), step):
            r = idx[g0 : g0 + step]
            k = len(r)
            A = np.concatenate([self.resid[r], self.B[r].transpose(0, 2, 1).reshape(k * p, n)])
            M = A @ Gt
            score = M[:k]
            v = M[k:].reshape(k, p, V)
            quad = self._quad[r] @ Gt2
            related = np.flatnonzero(self.sigma2_g[r] > 0) if self._groups else np.zeros(0, dtype=np.int64)
            if len(related):
                rr = r[related]
                quad[related] -= block_quad(self.Dw[rr], self.sigma2_g[rr], self._groups, Gt)
            var_h = quad - np.einsum("gpv,gpv->gv", v, np.matmul(self.Ainv[r], v))
            ok = var_h > VAR_RTOL * quad
            S[g0 : g0 + k] = np.where(ok, score, np.nan)
            Var[g0 : g0 + k] = np.where(ok, var_h, np.nan)
        return S, Var

    def pvalues(
        self, Gt: np.ndarray, S: np.ndarray, Var: np.ndarray, rows: np.ndarray | slice = slice(None)
    ) -> np.ndarray:
        """Two-sided p-values of :meth:`stats`' ``S`` and ``Var`` (same ``Gt``, ``rows``): the saddlepoint
        approximation where ``|z| > spa_cutoff`` (see :mod:`._spa`), the standard normal's elsewhere and where the
        saddlepoint fails."""
        pval = normal_pvalues(S, Var)
        if self.spa_cutoff is None:
            return pval
        with np.errstate(invalid="ignore", divide="ignore"):
            gi, vi = np.nonzero(np.abs(S) > self.spa_cutoff * np.sqrt(Var))
        if not len(gi):
            return pval
        idx = np.arange(self.n_genes)[rows]
        n = self.n_donors
        theta = np.full(self.n_genes, np.inf) if self.theta is None else self.theta
        theta = np.where(np.isfinite(theta), theta, np.inf)
        Gt = np.ascontiguousarray(Gt, dtype=np.float64)
        step = max(1, CHUNK_ELEMENTS // (4 * n))
        for lo in range(0, len(gi), step):
            m_g, m_v = gi[lo : lo + step], vi[lo : lo + step]
            genes = idx[m_g]
            F = self.projected(Gt, genes, m_v)
            out = np.empty(len(genes))
            _spa.spa_pvalues(F, self.Dw[genes], self.counts, theta[genes], S[m_g, m_v], Var[m_g, m_v], out)
            pval[m_g, m_v] = np.where(np.isfinite(out), out, pval[m_g, m_v])
        return pval

    def projected(self, Gt: np.ndarray, genes: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``f = Z'PZg`` (pairs x donors) of the pairs (gene ``genes[m]``, column ``cols[m]`` of ``Gt``), so that
        ``score_var = g'f``."""
        F = np.empty((len(genes), self.n_donors))
        _spa.projected_genotypes(
            np.asarray(genes, dtype=np.int64), np.asarray(cols, dtype=np.int64), self._quad, self.B, self.Ainv, Gt, F
        )
        s2 = self.sigma2_g[genes]
        if self._groups and (s2 > 0).any():
            Dw = self.Dw[genes]
            for grp in self._groups:
                # T D_w g on a block: D g - s2 D L K^-1 L' D g (the diagonal part D g is already in F)
                h = Dw[:, grp.idx] * Gt[grp.idx, cols[:, None, None]]
                H = np.matmul(grp.L.transpose(0, 2, 1)[None], h[..., None])
                sol = np.matmul(grp.L[None], block_solve(Dw, s2, grp, H))[..., 0]
                F[:, grp.idx] -= s2[:, None, None] * Dw[:, grp.idx] * sol
        return F


def usable_genes(tau: np.ndarray, s2e: np.ndarray, C: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Genes whose stored null model can be tested: finite ``tau >= 0``, ``sigma2_e > 0``, finite arrays."""
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(tau)
            & (tau >= 0)
            & np.isfinite(s2e)
            & (s2e > 0)
            & np.isfinite(R).all(axis=1)
            & np.isfinite(C).all(axis=(1, 2))
        )


def normal_pvalues(S: np.ndarray, Var: np.ndarray) -> np.ndarray:
    """Two-sided standard-normal p-values of ``z = S / sqrt(Var)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2.0 * special.ndtr(-np.abs(S / np.sqrt(Var)))


def derived_statistics(S: np.ndarray, Var: np.ndarray, pval: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``z``, ``pval`` (two-sided normal unless given, e.g. saddlepoint p-values), ``beta = S/Var`` and
    ``se = 1/sqrt(Var)`` from score and variance."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(Var)
        z = S / sd
        return {
            "score": S,
            "score_var": Var,
            "z": z,
            "pval": normal_pvalues(S, Var) if pval is None else pval,
            "beta": S / Var,
            "se": 1.0 / sd,
        }


def impute(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-impute missing dosages per variant; also return which variants are testable.

    A variant is testable when it has at least one observed dosage and is not monomorphic among the donors.
    """
    missing = np.isnan(G)
    all_missing = missing.all(axis=0)
    if missing.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nanmean(np.where(all_missing, 0.0, G), axis=0)
        G = np.where(missing, mean[None, :], G)
    poly = (G.max(axis=0, initial=-np.inf) > G.min(axis=0, initial=np.inf)) & ~all_missing
    return G, poly


def allele_stats(G: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Allele counts of dosages ``G`` (donors x variants, model order, NaN where missing), over the donors with an
    observed dosage: ``af`` (mean dosage / 2: the frequency of the counted allele), ``ma_samples`` (donors carrying
    the minor allele: dosage above 0.5 when the counted allele is minor, else below 1.5), ``ma_count`` (minor
    alleles, rounded), ``n_donors`` and ``n_cells`` (those donors' cells, from ``counts``).

    Mean imputation leaves ``af`` unchanged; a variant without any observed dosage has ``af`` NaN and zero counts.
    One compiled pass over ``G``.
    """
    G = np.ascontiguousarray(G, dtype=np.float64)
    n, total, cells, above, below = _allele_sums(G, np.asarray(counts, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        af = total / (2.0 * n)
    alt_minor = ~(af > 0.5)
    return {
        "af": af,
        "ma_samples": np.where(alt_minor, above, below),
        "ma_count": np.rint(np.where(alt_minor, total, 2.0 * n - total)).astype(np.int64),
        "n_donors": n,
        "n_cells": np.rint(cells).astype(np.int64),
    }


@jit()
def _allele_sums(G, counts):
    """Per column of ``G``: observed donors, dosage sum, their cells, donors above 0.5 and below 1.5."""
    n_donors, n_var = G.shape
    n = np.zeros(n_var, dtype=np.int64)
    above = np.zeros(n_var, dtype=np.int64)
    below = np.zeros(n_var, dtype=np.int64)
    total = np.zeros(n_var)
    cells = np.zeros(n_var)
    for i in range(n_donors):
        c = counts[i]
        for j in range(n_var):
            g = G[i, j]
            if g == g:  # not NaN
                n[j] += 1
                total[j] += g
                cells[j] += c
                if g > 0.5:
                    above[j] += 1
                if g < 1.5:
                    below[j] += 1
    return n, total, cells, above, below
