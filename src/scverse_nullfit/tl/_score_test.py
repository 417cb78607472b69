"""Exact score tests of genetic variants against stored null models: :func:`scverse_nullfit.tl.score_test`.

Everything comes from the compact projection that :func:`~scverse_nullfit.tl.fit_null` stores (DESIGN.md
section 4); no expression data and no cells x cells matrix are needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scanpy import settings
from scipy import sparse, special
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .._core._design import _preview
from .._core._read import _is_dask
from ._fit_null import _check_positive_int, _select_genes

if TYPE_CHECKING:
    from anndata import AnnData

#: Target number of float64 elements of one genes x covariates x variants block (bounds the memory of a chunk).
BLOCK_ELEMENTS = 1 << 23
#: A variant whose score variance is below this fraction of ``g~'(w*g~)`` is indistinguishable from the
#: covariates (or monomorphic) for that gene: its results are NaN.
VAR_RTOL = 1e-9
#: Columns of the result table of :func:`score_test`, in order.
RESULT_COLUMNS = ("gene", "variant", "score", "score_var", "z", "pval", "beta", "se")


# --------------------------------------------------------------------------------------------------------------
# the stored null models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CompactNull:
    """The compact projection of the fitted genes, as stored by ``fit_null``, ready for score tests.

    Arrays over genes cover only the usable (fitted) genes among those requested; ``var_index`` maps them back
    to ``adata.var_names``.
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

    @property
    def n_genes(self) -> int:
        return len(self.var_index)

    @classmethod
    def from_adata(cls, adata: AnnData, key: str, mask: np.ndarray) -> CompactNull:
        """Read the compact projection of the genes in ``mask`` that were fitted; checks shapes and keys."""
        hint = f"run snf.tl.fit_null(adata, key_added={key!r}) first"
        if key not in adata.uns:
            raise KeyError(f"no null-model fit under adata.uns[{key!r}]; {hint}.")
        for name in (key, f"{key}_xhx_inv", f"{key}_resid_rot"):
            if name not in adata.varm:
                raise KeyError(f"adata.varm[{name!r}] is missing; {hint}.")
        shared = adata.uns[key]
        needed = ("donors", "cells_per_donor", "eigenvalues", "eigenvectors", "covariates_rotated", "covariate_names")
        for name in needed:
            if name not in shared:
                raise KeyError(f"adata.uns[{key!r}] has no {name!r}; {hint}.")
        donors = pd.Index(np.asarray(shared["donors"]).astype(str))
        n = len(donors)
        counts = np.asarray(shared["cells_per_donor"], dtype=np.float64)
        lam = np.asarray(shared["eigenvalues"], dtype=np.float64)
        U = np.asarray(shared["eigenvectors"], dtype=np.float64)
        Xrot = np.asarray(shared["covariates_rotated"], dtype=np.float64)
        names = [str(x) for x in np.atleast_1d(shared["covariate_names"])]
        p = Xrot.shape[1] if Xrot.ndim == 2 else -1
        table = adata.varm[key]
        C_all = np.asarray(adata.varm[f"{key}_xhx_inv"])
        R_all = np.asarray(adata.varm[f"{key}_resid_rot"])
        shapes_ok = (
            counts.shape == (n,)
            and lam.shape == (n,)
            and U.shape == (n, n)
            and Xrot.shape == (n, p)
            and C_all.shape == (adata.n_vars, p, p)
            and R_all.shape == (adata.n_vars, n)
            and isinstance(table, pd.DataFrame)
            and {"tau", "sigma2_e"} <= set(table.columns)
        )
        if not shapes_ok:
            raise ValueError(
                f"the null-model fit under key {key!r} is inconsistent ({n} donors; eigenvectors {U.shape}, "
                f"covariates_rotated {Xrot.shape}, {key}_xhx_inv {C_all.shape}, {key}_resid_rot {R_all.shape}); "
                "re-run snf.tl.fit_null."
            )
        if (counts <= 0).any():
            raise ValueError(f"adata.uns[{key!r}]['cells_per_donor'] has donors without cells.")
        usable = _usable(table, C_all, R_all)
        idx = np.flatnonzero(mask & usable)
        tau = table["tau"].to_numpy(dtype=np.float64, na_value=np.nan)[idx]
        s2e = table["sigma2_e"].to_numpy(dtype=np.float64, na_value=np.nan)[idx]
        W = 1.0 / (1.0 + tau[:, None] * lam[None, :])
        return cls(
            var_index=idx,
            donors=donors,
            counts=counts,
            U=U,
            Xrot=Xrot,
            centre="intercept" in names,
            W=W,
            WR=W * R_all[idx],
            s2e=s2e,
            C=np.ascontiguousarray(C_all[idx]),
        )

    def rotate(self, G: np.ndarray, poly: np.ndarray | None = None) -> np.ndarray:
        """``g~ = U' D^1/2 g`` of every column of ``G`` (donors x variants, model order, no missing values).

        With an intercept in the design each variant is first centred by its cell-weighted mean: ``Z(g - m)``
        differs from ``Zg`` by a multiple of the intercept column, which leaves score and variance unchanged.
        Columns where ``poly`` is False (monomorphic variants) are returned as exact zeros, so that their
        results come out NaN.
        """
        if self.centre:
            G = G - (self.counts @ G) / self.counts.sum()
        Gt = self.U.T @ (np.sqrt(self.counts)[:, None] * G)
        if poly is not None and not poly.all():
            Gt[:, ~poly] = 0.0
        return Gt

    def gene_chunk(self) -> int:
        """Genes per chunk so that the weighted covariates ``w * X~`` of a chunk stay near ``BLOCK_ELEMENTS``."""
        n, p = self.Xrot.shape
        return int(max(1, BLOCK_ELEMENTS // max(1, n * p)))

    def stats(self, Gt: np.ndarray, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Score and its variance, (genes x variants), for the genes ``rows`` and rotated variants ``Gt``.

        ``S = g~'(w*r~)/s2e`` and ``Var = [g~'(w*g~) - v'Cv]/s2e`` with ``v = X~'(w*g~)``. For a chunk of genes,
        the scores and all genes' ``v`` come from one GEMM of the stacked ``(w*r~)'`` and ``(w * X~)'``
        (genes*(p+1) x donors) with ``g~``, ``g~'(w*g~)`` from ``W @ g~^2``, and the quadratic form is a
        batched matmul. Entries whose variance is not
        clearly positive (monomorphic variants, variants collinear with the covariates) are NaN.
        """
        idx = np.arange(self.n_genes)[rows]
        n, V = Gt.shape
        p = self.Xrot.shape[1]
        XrotT = np.ascontiguousarray(self.Xrot.T)
        Gt2 = Gt * Gt
        S = np.empty((len(idx), V))
        Var = np.empty((len(idx), V))
        step = self.gene_chunk()
        for g0 in range(0, len(idx), step):
            r = idx[g0 : g0 + step]
            W, s2e, k = self.W[r], self.s2e[r][:, None], len(r)
            # one GEMM for the scores and v: rows (w*r~)' of the genes, then (w*X~)' stacked over genes
            A = np.concatenate([self.WR[r], (W[:, None, :] * XrotT[None, :, :]).reshape(k * p, n)])
            B = A @ Gt
            score = B[:k] / s2e
            v = B[k:].reshape(k, p, V)
            a = W @ Gt2
            var_h = a - np.einsum("gpv,gpv->gv", v, np.matmul(self.C[r], v))
            ok = var_h > VAR_RTOL * a
            S[g0 : g0 + len(r)] = np.where(ok, score, np.nan)
            Var[g0 : g0 + len(r)] = np.where(ok, var_h, np.nan) / s2e
        return S, Var

    def variant_chunk(self, n_genes: int | None = None) -> int:
        """Variants per chunk so that the genes x variants outputs and a gene chunk's covariates x variants
        block stay near ``BLOCK_ELEMENTS`` each."""
        g = max(1, self.n_genes if n_genes is None else n_genes)
        n, p = self.Xrot.shape
        per_variant = 2 * g + 2 * min(g, self.gene_chunk()) * p + 3 * n
        return int(max(1, min(BLOCK_ELEMENTS // per_variant, 1 << 16)))


def _usable(table: pd.DataFrame, C_all: np.ndarray, R_all: np.ndarray) -> np.ndarray:
    tau = table["tau"].to_numpy(dtype=np.float64, na_value=np.nan)
    s2e = table["sigma2_e"].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(tau)
            & (tau >= 0)
            & np.isfinite(s2e)
            & (s2e > 0)
            & np.isfinite(R_all).all(axis=1)
            & np.isfinite(C_all).all(axis=(1, 2))
        )


def fitted_genes(adata: AnnData, key: str) -> np.ndarray:
    """Boolean mask over ``adata.var_names`` of the genes with a usable null model under ``key``."""
    if key not in adata.varm or f"{key}_xhx_inv" not in adata.varm or f"{key}_resid_rot" not in adata.varm:
        raise KeyError(
            f"no null-model fit under adata.varm[{key!r}]; run snf.tl.fit_null(adata, key_added={key!r}) first."
        )
    table = adata.varm[key]
    if not isinstance(table, pd.DataFrame) or not {"tau", "sigma2_e"} <= set(table.columns):
        raise ValueError(f"adata.varm[{key!r}] is not the table fit_null stores; re-run snf.tl.fit_null.")
    return _usable(table, np.asarray(adata.varm[f"{key}_xhx_inv"]), np.asarray(adata.varm[f"{key}_resid_rot"]))


def derived_statistics(S: np.ndarray, Var: np.ndarray) -> dict[str, np.ndarray]:
    """``z``, two-sided normal ``pval``, ``beta = S/Var`` and ``se = 1/sqrt(Var)`` from score and variance."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(Var)
        z = S / sd
        return {
            "score": S,
            "score_var": Var,
            "z": z,
            "pval": 2.0 * special.ndtr(-np.abs(z)),
            "beta": S / Var,
            "se": 1.0 / sd,
        }


# --------------------------------------------------------------------------------------------------------------
# genotype inputs
# --------------------------------------------------------------------------------------------------------------


class GenotypeMatrix:
    """A donors x variants dosage matrix from a DataFrame, an AnnData (in memory or backed) or a PLINK fileset.

    ``read(rows, cols)`` returns float64 dosages (NaN where missing) of integer donor rows and variant columns.
    ``var`` holds the variants' metadata (a DataFrame indexed by variant ID, possibly without columns).
    """

    def __init__(self, genotypes, *, variants: pd.DataFrame | None = None):
        from anndata import AnnData

        from ..io._genotypes import PlinkGenotypes

        self._df = self._X = self._plink = None
        if isinstance(genotypes, pd.DataFrame):
            dtypes = genotypes.dtypes
            kinds = {dt: _numeric(dt) for dt in set(dtypes)}
            bad = [c for c, dt in zip(genotypes.columns, dtypes, strict=True) if not kinds[dt]]
            if bad:
                dtype = dtypes.iloc[genotypes.columns.get_loc(bad[0])]
                raise ValueError(f"genotype columns must hold numeric dosages; column {bad[0]!r} has dtype {dtype}.")
            self._df = genotypes
            donors, var = genotypes.index, pd.DataFrame(index=genotypes.columns)
            self.source = "DataFrame"
        elif isinstance(genotypes, AnnData):
            self._X = genotypes.X
            if self._X is None:
                raise ValueError("the genotype AnnData has no X (dosages).")
            donors, var = genotypes.obs_names, genotypes.var
            self.source = "AnnData"
        elif isinstance(genotypes, (str, os.PathLike)):
            self._plink = PlinkGenotypes(genotypes)
            donors, var = self._plink.obs.index, self._plink.var
            self.source = os.fspath(genotypes)
        elif isinstance(genotypes, PlinkGenotypes):
            self._plink = genotypes
            donors, var = genotypes.obs.index, genotypes.var
            self.source = str(genotypes.path)
        else:
            raise ValueError(
                "genotypes must be a DataFrame (donors x variants), an AnnData (donors x variants) or a PLINK "
                f"prefix, not {type(genotypes).__name__}."
            )
        self.donors = pd.Index(np.asarray(donors).astype(str))
        if self.donors.has_duplicates:
            raise ValueError(
                f"genotypes have duplicated donor IDs: {_preview(self.donors[self.donors.duplicated()].unique())}."
            )
        var = var.copy()
        var.index = pd.Index(np.asarray(var.index).astype(str), name=var.index.name or "variant")
        if var.index.has_duplicates:
            raise ValueError(
                f"genotypes have duplicated variant IDs: {_preview(var.index[var.index.duplicated()].unique())}."
            )
        if variants is not None:
            if not isinstance(variants, pd.DataFrame):
                raise ValueError(f"variants must be a DataFrame indexed by variant ID, not {type(variants).__name__}.")
            vidx = pd.Index(np.asarray(variants.index).astype(str))
            pos = vidx.get_indexer(var.index)
            if (pos < 0).any():
                raise KeyError(f"variants has no row for genotype variants {_preview(var.index[pos < 0])}.")
            extra = variants.iloc[pos]
            extra.index = var.index
            var = var.drop(columns=[c for c in extra.columns if c in var.columns]).join(extra)
        self.var = var

    @property
    def n_variants(self) -> int:
        return self.var.shape[0]

    def align(self, donors: pd.Index) -> np.ndarray:
        """Rows of the model's donors, in model order; donors of the fit without genotypes are an error."""
        rows = self.donors.get_indexer(donors)
        if (rows < 0).any():
            raise ValueError(f"donors of the null-model fit have no genotypes: {_preview(donors[rows < 0])}.")
        return rows

    def read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.intp)
        if self._df is not None:
            out = self._df.iloc[:, cols].to_numpy(dtype=np.float64, na_value=np.nan)[rows]
        elif self._plink is not None:
            out = self._plink.read(rows, cols)
        else:
            out = _read_matrix(self._X, rows, cols)
        bad = np.isinf(out).any(axis=0)
        if bad.any():
            raise ValueError(f"genotypes have infinite dosages in variants {_preview(self.var.index[cols[bad]])}.")
        return out


def _numeric(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)


def _read_matrix(X, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Columns ``cols`` and rows ``rows`` of a dense, sparse, backed or dask matrix, as a dense float64 array."""
    # backed storage wants increasing indices: read sorted unique columns, then reorder
    ucols, inverse = np.unique(cols, return_inverse=True)
    if sparse.issparse(X):
        block = X[:, ucols].toarray()
    elif _is_dask(X):
        block = np.asarray(X[:, ucols].compute())
    else:  # numpy array, h5py dataset or anndata backed sparse dataset
        block = X[:, ucols]
        block = block.toarray() if sparse.issparse(block) else np.asarray(block)
    return np.asarray(block, dtype=np.float64)[rows][:, inverse]


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


# --------------------------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------------------------


def score_test(
    adata: AnnData,
    genotypes: pd.DataFrame | AnnData | str | os.PathLike,
    *,
    key: str = "nullfit",
    genes: Sequence[str] | np.ndarray | None = None,
    chunk_size: int | None = None,
    n_threads: int | None = None,
) -> pd.DataFrame:
    """Exact score test of every variant against every gene's fitted null model.

    For a gene with null model ``y = X b + Z u + e`` (fitted by :func:`~scverse_nullfit.tl.fit_null`) and a
    donor-level variant ``g`` (in cells ``Z g``), the score test of adding ``Z g`` as a fixed effect is

    - ``score`` ``S = (Zg)' P y``, with ``P = V^-1 - V^-1 X (X'V^-1 X)^-1 X'V^-1`` and
      ``V = sigma2_e (I + tau Z G Z')`` at the gene's fitted ``tau`` and ``sigma2_e``;
    - ``score_var`` ``Var = (Zg)' P (Zg)``, the variance of ``S`` under the null;
    - ``z = S / sqrt(Var)`` and ``pval``, its two-sided standard-normal p-value;
    - ``beta = S / Var``, the variant's effect (expression units per allele) estimated by generalised least
      squares with the null model's variance components held fixed, and ``se = 1 / sqrt(Var)`` its standard error.

    These are computed exactly from the compact projection that ``fit_null`` stores (see the "Model and
    algorithm" page of the docs): ``S = g~'(w * r~)/sigma2_e`` and ``Var = [g~'(w * g~) - v'Cv]/sigma2_e`` with
    ``g~ = U' D^1/2 g``, ``w = 1/(1 + tau lam)``, ``v = X~'(w * g~)`` and ``C = (X'H^-1 X)^-1``. No expression
    data is read: the test works on an AnnData read back from h5ad whose ``X`` is gone. Each variant is rotated
    once for all genes; genes x variants are computed in matrix products, in chunks of variants.

    Parameters
    ----------
    adata
        The AnnData on which :func:`~scverse_nullfit.tl.fit_null` was run.
    genotypes
        Dosages (0..2) of the donors: a DataFrame indexed by donor ID with one column per variant, an AnnData of
        donors x variants (``obs_names`` donor IDs, ``var_names`` variant IDs; ``X`` dense, sparse or backed), or
        the path of a PLINK ``.bed`` fileset (needs ``bed-reader``; donors named by IID). Donors are matched by
        ID in any order; every donor of the fit must be present (extra donors are ignored). Missing dosages
        (NaN) are replaced by the variant's mean dosage over the fit's donors that have one.
    key
        The ``key_added`` of the ``fit_null`` call.
    genes
        Names or a boolean mask of the genes to test (default: all genes).
    chunk_size
        Variants per chunk (default: chosen so that a chunk takes about 64 MB per array).
    n_threads
        Limit on BLAS threads for the call.

    Returns
    -------
    A long DataFrame with one row per gene and variant (genes in ``adata`` order, then variants in input order)
    and the columns ``gene``, ``variant`` (categoricals), ``score``, ``score_var``, ``z``, ``pval``, ``beta``,
    ``se``. Rows are NaN for genes that were not fitted, for variants without any observed dosage or
    monomorphic among the fit's donors, and for variants collinear with the gene's covariates.
    """
    _check_positive_int(chunk_size, "chunk_size")
    _check_positive_int(n_threads, "n_threads")
    mask = _select_genes(adata.var_names, genes)
    model = CompactNull.from_adata(adata, key, mask)
    geno = genotypes if isinstance(genotypes, GenotypeMatrix) else GenotypeMatrix(genotypes)
    rows = geno.align(model.donors)

    start = logg.info(f"score tests of {geno.n_variants} variants against {int(mask.sum())} genes (key={key!r})")
    sel = np.flatnonzero(mask)
    pos_in_sel = np.searchsorted(sel, model.var_index)
    n_sel, n_var = len(sel), geno.n_variants
    S_all = np.full((n_sel, n_var), np.nan)
    V_all = np.full((n_sel, n_var), np.nan)
    step = int(chunk_size) if chunk_size is not None else model.variant_chunk()
    show = settings.verbosity >= 2 and n_var > 10 * step
    with (
        threadpool_limits(limits=n_threads, user_api="blas"),
        tqdm(total=n_var, desc="variants", unit="variant", disable=not show) as bar,
    ):
        for v0 in range(0, n_var, step):
            cols = np.arange(v0, min(n_var, v0 + step))
            G, poly = impute(geno.read(rows, cols))
            if model.n_genes and poly.any():
                S, Var = model.stats(model.rotate(G, poly))
                S_all[np.ix_(pos_in_sel, cols)] = S
                V_all[np.ix_(pos_in_sel, cols)] = Var
            bar.update(len(cols))

    stats = derived_statistics(S_all.ravel(), V_all.ravel())
    gene_names = adata.var_names[sel]
    out = pd.DataFrame(
        {
            "gene": pd.Categorical.from_codes(
                np.repeat(np.arange(n_sel), n_var), categories=pd.Index(np.asarray(gene_names))
            ),
            "variant": pd.Categorical.from_codes(
                np.tile(np.arange(n_var), n_sel), categories=pd.Index(np.asarray(geno.var.index))
            ),
            **stats,
        }
    )
    logg.info("    finished", time=start)
    return out
