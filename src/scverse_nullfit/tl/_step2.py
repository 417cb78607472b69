"""Step-2 orchestration shared by :func:`~scverse_nullfit.tl.score_test` and :func:`~scverse_nullfit.tl.cis_map`.

Reads the stored null models (:class:`StoredNull`) and the genotypes (through :mod:`scverse_nullfit.io`), sets
the thread limit and the progress bar (:func:`running`), and assembles result tables (:func:`result_table`); the
array maths is :mod:`scverse_nullfit._core._step2`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import settings
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .._constants import Key
from .._core._glmm import DonorBlocks
from .._core._spa import SPA_CUTOFF
from .._core._step2 import CompactNull, CountNull, allele_stats, derived_statistics, usable_genes
from .._core._store import unpack_symmetric
from .._provenance import CELLS, FIT_ID, SOURCE, check_cells
from .._utils import check_positive_int, resolve_threads
from ..io._genotypes import GenotypeMatrix

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass
class StoredNull:
    """The null-model fit stored under ``key``, checked once; :meth:`compact` selects genes for testing."""

    key: str
    donors: pd.Index
    counts: np.ndarray
    lam: np.ndarray
    U: np.ndarray
    Xrot: np.ndarray
    covariate_names: list[str]
    tau: np.ndarray  #: (all genes,)
    s2e: np.ndarray  #: (all genes,)
    C: np.ndarray  #: (all genes, p, p)
    R: np.ndarray  #: (all genes, donors)
    usable: np.ndarray  #: (all genes,) bool: a testable null model
    family: str = "gaussian"  #: the model family of the fit
    count: dict | None = None  #: count families: sigma2_g, Dw, B (all genes) and the donor covariance blocks
    fit_id: str = ""  #: the fit's unique identifier (results derived from it record it)

    @classmethod
    def read(cls, adata: AnnData, key: str) -> StoredNull:
        """Read and check what ``fit_null(key_added=key)`` stored (keys, shapes), naming what is wrong."""
        hint = f"run snf.tl.fit_null(adata, key_added={key!r}) first"
        if key not in adata.uns:
            raise KeyError(f"no null-model fit under adata.uns[{key!r}]; {hint}.")
        for name in (key, Key.xhx_inv(key), Key.resid_rot(key)):
            if name not in adata.varm:
                raise KeyError(f"adata.varm[{name!r}] is missing; {hint}.")
        shared = adata.uns[key]
        for name in Key.NULL_SHARED:
            if name not in shared:
                raise KeyError(f"adata.uns[{key!r}] has no {name!r}; {hint}.")
        check_cells(
            adata, shared.get(CELLS), f"the null-model fit under {key!r}", f"Re-run {hint.removeprefix('run ')}"
        )
        donors = pd.Index(np.asarray(shared["donors"], dtype=object).astype(str))  # zarr gives StringDType
        n = len(donors)
        counts = np.asarray(shared["cells_per_donor"], dtype=np.float64)
        lam = np.asarray(shared["eigenvalues"], dtype=np.float64)
        U = np.asarray(shared["eigenvectors"], dtype=np.float64)
        Xrot = np.asarray(shared["covariates_rotated"], dtype=np.float64)
        names = [str(x) for x in np.atleast_1d(shared["covariate_names"])]
        p = Xrot.shape[1] if Xrot.ndim == 2 else -1
        table = adata.varm[key]
        try:
            C = unpack_symmetric(adata.varm[Key.xhx_inv(key)], max(p, 0))
        except ValueError as err:
            raise ValueError(f"adata.varm[{Key.xhx_inv(key)!r}]: {err}; re-run snf.tl.fit_null.") from err
        R = np.asarray(adata.varm[Key.resid_rot(key)], dtype=np.float64)
        shapes_ok = (
            counts.shape == (n,)
            and lam.shape == (n,)
            and U.shape == (n, n)
            and Xrot.shape == (n, p)
            and C.shape == (adata.n_vars, p, p)
            and R.shape == (adata.n_vars, n)
            and isinstance(table, pd.DataFrame)
            and {"tau", "sigma2_e"} <= set(table.columns)
        )
        if not shapes_ok:
            raise ValueError(
                f"the null-model fit under key {key!r} is inconsistent ({n} donors; eigenvectors {U.shape}, "
                f"covariates_rotated {Xrot.shape}, {Key.xhx_inv(key)} {C.shape}, {Key.resid_rot(key)} {R.shape}); "
                "re-run snf.tl.fit_null."
            )
        if (counts <= 0).any():
            raise ValueError(f"adata.uns[{key!r}]['cells_per_donor'] has donors without cells.")
        tau = table["tau"].to_numpy(dtype=np.float64, na_value=np.nan)
        s2e = table["sigma2_e"].to_numpy(dtype=np.float64, na_value=np.nan)
        params = shared.get(Key.PARAMS, {})
        family = str(params.get("family", "gaussian")) if hasattr(params, "get") else "gaussian"
        if family in Key.COUNT_FAMILIES:
            out = cls._read_count(adata, key, family, donors, counts, lam, U, Xrot, names, tau, s2e, C, R, hint)
        else:
            out = cls(key, donors, counts, lam, U, Xrot, names, tau, s2e, C, R, usable_genes(tau, s2e, C, R))
        out.fit_id = str(shared.get(FIT_ID, ""))
        return out

    def record(self) -> dict:
        """What a result derived from this fit records about it (see :mod:`scverse_nullfit._provenance`)."""
        return {"key": self.key, FIT_ID: self.fit_id, "model": self.family}

    @classmethod
    def _read_count(cls, adata, key, family, donors, counts, lam, U, Xrot, names, tau, s2e, C, R, hint):
        """The count-family part: the working weights, ``T Z'WX`` and the donor covariance blocks."""
        n, p = len(donors), Xrot.shape[1]
        for name in (Key.working_weights(key), Key.working_xw(key)):
            if name not in adata.varm:
                raise KeyError(f"adata.varm[{name!r}] is missing; {hint}.")
        blocks_entry = adata.uns[key].get(Key.GRM_BLOCKS)
        if blocks_entry is None or not all(k in blocks_entry for k in ("ptr", "donors", "L", "loff")):
            raise KeyError(f"adata.uns[{key!r}] has no complete {Key.GRM_BLOCKS!r}; {hint}.")
        blocks = DonorBlocks(*(np.asarray(blocks_entry[k]) for k in ("ptr", "donors", "L", "loff")))
        Dw = np.asarray(adata.varm[Key.working_weights(key)], dtype=np.float64)
        B = np.asarray(adata.varm[Key.working_xw(key)], dtype=np.float64)
        if B.ndim == 2 and B.shape == (adata.n_vars, n * p):  # stored 2-D (genes x donors p), row-major
            B = B.reshape(adata.n_vars, n, p)
        s2g = adata.varm[key]["sigma2_g"].to_numpy(dtype=np.float64, na_value=np.nan)
        if Dw.shape != (adata.n_vars, n) or B.shape != (adata.n_vars, n, p) or blocks.n_donors != n:
            raise ValueError(
                f"the count null-model fit under key {key!r} is inconsistent ({n} donors, {p} covariates; "
                f"working weights {Dw.shape}, working_xw {B.shape}); re-run snf.tl.fit_null."
            )
        with np.errstate(invalid="ignore"):
            usable = (
                np.isfinite(s2g)
                & (s2g >= 0)
                & np.isfinite(Dw).all(axis=1)
                & np.isfinite(B).all(axis=(1, 2))
                & np.isfinite(R).all(axis=1)
                & np.isfinite(C).all(axis=(1, 2))
            )
        theta = adata.varm[key]["theta"].to_numpy(dtype=np.float64, na_value=np.nan) if family != "poisson" else None
        count = {"sigma2_g": s2g, "Dw": Dw, "B": B, "blocks": blocks, "theta": theta}
        return cls(key, donors, counts, lam, U, Xrot, names, tau, s2e, C, R, usable, family, count)

    def compact(self, mask: np.ndarray, spa: bool = False) -> CompactNull | CountNull:
        """The compact null model of the usable genes in ``mask`` (a boolean mask over all genes); ``spa``: count
        models give saddlepoint p-values where ``|z| > SPA_CUTOFF``."""
        idx = np.flatnonzero(mask & self.usable)
        if self.count is not None:
            c = self.count
            return CountNull(
                var_index=idx, donors=self.donors, counts=self.counts, centre="intercept" in self.covariate_names,
                sigma2_g=c["sigma2_g"][idx], Dw=c["Dw"][idx], B=c["B"][idx], Ainv=self.C[idx], resid=self.R[idx],
                blocks=c["blocks"], theta=None if c["theta"] is None else c["theta"][idx],
                spa_cutoff=SPA_CUTOFF if spa else None,
            )  # fmt: skip
        return CompactNull.from_arrays(
            idx, self.donors, self.counts, self.lam, self.U, self.Xrot, self.covariate_names,
            self.tau[idx], self.s2e[idx], self.C[idx], self.R[idx],
        )  # fmt: skip


def check_mapping_arguments(key: str, key_added: str, chunk_size, n_threads) -> None:
    """The arguments every mapping tool (cis, trans) takes: positive counts, and a ``key_added`` that does not
    overwrite the null-model fit under ``key``."""
    check_positive_int(chunk_size, "chunk_size")
    check_positive_int(n_threads, "n_threads")
    if key_added in Key.null_varm(key):
        raise ValueError(f"key_added={key_added!r} would overwrite the null-model fit stored under key={key!r}.")


def open_genotypes(genotypes, variants: pd.DataFrame | None = None, **reader_options) -> GenotypeMatrix:
    """``genotypes`` as a :class:`~scverse_nullfit.io._genotypes.GenotypeMatrix` (passed through if it is one);
    ``reader_options`` go to the reader of a file path. Close it with :func:`close_genotypes`."""
    if isinstance(genotypes, GenotypeMatrix):
        return genotypes
    return GenotypeMatrix(genotypes, variants=variants, reader_options=reader_options)


def close_genotypes(geno: GenotypeMatrix, genotypes) -> None:
    """Close what :func:`open_genotypes` opened for ``genotypes`` (a file reader opened from a path)."""
    if geno is not genotypes:
        geno.close()


@contextmanager
def running(n_threads: int | None, total: int, unit: str, *, show_above: int) -> Iterator[tqdm]:
    """The BLAS thread limit of the call and a progress bar over ``total`` ``unit``\\ s (shown at verbosity
    >= 2 when ``total > show_above``)."""
    show = settings.verbosity >= 2 and total > show_above
    with (
        threadpool_limits(limits=resolve_threads(n_threads), user_api="blas"),
        tqdm(total=total, desc=f"{unit}s", unit=unit, disable=not show) as bar,
    ):
        yield bar


class VariantInfo:
    """The per-variant columns of the step-2 tables (:data:`VARIANT_COLUMNS`): alleles from the genotype source,
    allele counts from the dosages as the engine reads them (:meth:`update`, once per variant chunk).

    ``alt`` is the counted allele (the one whose dosage is tested, so ``beta`` is its effect) and ``af`` its
    frequency; the counts are over the fit's donors with an observed dosage (see
    :func:`~scverse_nullfit._core._step2.allele_stats`).
    """

    def __init__(self, geno: GenotypeMatrix, counts: np.ndarray):
        n = geno.n_variants
        self.ref, self.alt = geno.alleles()
        self.counts = np.asarray(counts, dtype=np.float64)
        self.af = np.full(n, np.nan)
        # donor counts fit in int32 (tensorQTL's type for them); cells get int64
        self.counts_by_name = {
            name: np.zeros(n, dtype=np.int64 if name == "n_cells" else np.int32) for name in COUNT_COLUMNS
        }

    def update(self, cols: np.ndarray, G: np.ndarray) -> None:
        """Record the allele counts of the variants ``cols`` from their raw dosages ``G`` (model donor order)."""
        stats = allele_stats(G, self.counts)
        self.af[cols] = stats["af"]
        for name, values in self.counts_by_name.items():
            values[cols] = stats[name]

    def columns(self, idx: np.ndarray) -> dict[str, np.ndarray | pd.Categorical]:
        """The columns for table rows of the variants ``idx`` (integer positions in the genotypes)."""
        idx = np.asarray(idx, dtype=np.intp)
        out: dict = {
            name: pd.Categorical.from_codes(c.codes[idx], categories=c.categories)
            for name, c in (("ref", self.ref), ("alt", self.alt))
        }
        out["af"] = self.af[idx]
        out.update({name: values[idx] for name, values in self.counts_by_name.items()})
        return out


#: Integer per-variant columns of the step-2 tables.
COUNT_COLUMNS = ("ma_samples", "ma_count", "n_donors", "n_cells")
#: Every per-variant column of the step-2 tables, in table order.
VARIANT_COLUMNS = ("ref", "alt", "af", *COUNT_COLUMNS)


def result_table(
    genes: pd.Index,
    gene_codes: np.ndarray,
    variants: pd.Index,
    variant_codes: np.ndarray,
    S,
    Var,
    *,
    info: VariantInfo | None = None,
    info_rows: np.ndarray | None = None,
    pval: np.ndarray | None = None,
    **extra,
) -> pd.DataFrame:
    """A long result table: ``gene`` and ``variant`` categoricals (codes into ``genes`` / ``variants``), the
    ``extra`` columns, the per-variant columns of ``info`` (for the genotype positions ``info_rows`` of the rows,
    default ``variant_codes``), then the score-test statistics of ``S`` and ``Var`` (with the p-values ``pval`` when
    given, e.g. saddlepoint p-values)."""
    variant_cols = {} if info is None else info.columns(variant_codes if info_rows is None else info_rows)
    return pd.DataFrame(
        {
            "gene": pd.Categorical.from_codes(gene_codes, categories=pd.Index(np.asarray(genes))),
            "variant": pd.Categorical.from_codes(variant_codes, categories=pd.Index(np.asarray(variants))),
            **extra,
            **variant_cols,
            **derived_statistics(S, Var, pval),
        }
    )


def store_derived(
    adata: AnnData, key_added: str, per_gene: pd.DataFrame, entries: dict, params: dict, stored: StoredNull, *, copy
) -> AnnData:
    """Write a step-2 tool's results (into a copy with ``copy=True``): the per-gene table in ``varm[key_added]``;
    ``entries``, ``params``, the fit they came from and its cells' fingerprint in ``uns[key_added]``."""
    target = adata.copy() if copy else adata
    target.varm[key_added] = per_gene
    target.uns[key_added] = {
        **entries,
        Key.PARAMS: params,
        SOURCE: stored.record(),
        CELLS: dict(adata.uns[stored.key].get(CELLS, {})),
    }
    return target
