"""The null-model fit: :func:`scverse_nullfit.tl.fit_null`."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scanpy import settings
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .._constants import Key
from .._core import _glmm
from .._core._design import align_grm, as_list, build_design, design_sums, donor_labels, spectral_precompute
from .._core._read import ColumnReader, describe_matrix, get_expression
from .._core._reml import RemlProblem, Rotation
from .._core._store import (
    blocks_part,
    count_results_frame,
    pack_symmetric,
    per_gene_arrays,
    results_frame,
    shared_part,
    store,
)
from .._core._suffstats import pre_residualise, scaled_residual_sums
from .._docs import doc_copy, doc_n_threads, doc_params
from .._provenance import CELLS, FIT_ID, cell_fingerprint, describe_frame, group_fingerprint, new_fit_id
from .._utils import check_positive_int, check_unique_var_names, is_dask, resolve_threads, select_genes
from .._version import __version__
from ._backend import compute_sufficient_stats, fit_all_genes
from ._groups import fit_subsets, group_key, groups_of
from ._inputs import grm_param, resolve_grm

if TYPE_CHECKING:
    from anndata import AnnData


def _stage1_and_pass(Y, genes: np.ndarray, donors, X: np.ndarray, G: np.ndarray, n_threads: int):
    """Stage 1 (the eigendecomposition and the REML's shared parts) and the pass over the expression with its OLS
    pre-residuals (independent), side by side: stage 1 on one thread (one BLAS thread), the pass and the
    pre-residuals on the other ``n_threads - 1``, and on all of them once the eigendecomposition is done (the two
    share ``n_threads`` slots). Returns the pre-residuals, the stage 1 spectral part and the REML problem.

    One thread keeps the eigendecomposition's bits the same whatever ``n_threads`` (the results are bit-identical
    across thread counts), and a multi-threaded eigendecomposition waits on each of its threads thousands of times, so
    on a small machine it stalls whenever another process holds a core (measured here: 7-16 s instead of 0.6 s in 4
    of 10 runs beside another job). It releases the GIL (``eigh_or_error``), so the pass runs while it works; a pass
    on all ``n_threads`` beside it would oversubscribe the cores (seed: 3.20 s median vs 2.96 s with n_threads - 1).
    The pre-residuals need only the design's sums, not the eigendecomposition, so they run on the pass's side."""
    t1 = logg.debug("    stage 1: donor-level eigendecomposition, alongside the pass")
    sums = design_sums(donors, X)

    def stage1():
        spectral = spectral_precompute(G, donors, X, sums=sums)
        problem = RemlProblem(spectral)
        logg.debug(f"    stage 1: {len(donors.ids)} donors, {X.shape[1]} design columns", time=t1)
        return spectral, problem

    def pass_and_pre(slots=None):
        stats = compute_sufficient_stats(Y, genes, donors, X, n_threads=n_threads, slots=slots)
        return pre_residualise(stats, donors, sums, n_threads=n_threads, slots=slots)

    if n_threads <= 1:
        return (pass_and_pre(), *stage1())
    slots = threading.Semaphore(n_threads)
    slots.acquire()  # stage 1's slot, held until its eigendecomposition is done

    def stage1_in_slot():
        try:
            return stage1()
        finally:
            slots.release()

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(1, "snf-stage1") as pool:
        spectral = pool.submit(stage1_in_slot)
        pre = pass_and_pre(slots)
        return (pre, *spectral.result())


@doc_params(doc_n_threads=doc_n_threads, doc_copy=doc_copy)
def fit_null(
    adata: AnnData,
    *,
    donor_key: str = "donor_id",
    grm: str | os.PathLike | pd.DataFrame = "grm",
    covariates: Sequence[str] = (),
    donor_covariates: Sequence[str] | None = None,
    layer: str | None = None,
    genes: Sequence[str] | np.ndarray | None = None,
    tau: float | None = None,
    family: str = "gaussian",
    offset: str | None = None,
    key_added: str = "nullfit",
    groupby: str | None = None,
    n_threads: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Fit the null mixed model of every gene: Gaussian by exact REML, or a count GLMM by Laplace ML.

    For each gene, cell-level expression is modelled as covariates plus a donor random effect with covariance
    ``sigma2_g * GRM`` plus independent cell noise ``sigma2_e``, with ``tau = sigma2_g / sigma2_e`` estimated per
    gene. Stage 1 (once) eigendecomposes the donor-level matrix; stage 2 fits all genes at once from their
    sufficient statistics, never forming a cells x cells matrix. See the "Model and algorithm" page of the docs.

    With ``family="poisson"`` or ``"negative_binomial"`` the raw counts follow a log-linear mixed model,
    ``log mu = offset + X b + u_donor``, ``u ~ N(0, sigma2_g GRM)``, Poisson or NB2 (per-gene ``theta``), fitted by
    maximum likelihood with the Laplace approximation: the objective of ``lme4::glmer`` (Poisson) and of
    glmmTMB's ``nbinom2``, whose log-likelihood convention is kept.

    Parameters
    ----------
    adata
        Cells x genes. Expression in ``X`` or ``layers[layer]``: dense, scipy sparse, backed or dask.
    donor_key
        Column of ``obs`` with each cell's donor ID.
    grm
        The donor genetic relationship matrix: a key of ``adata.uns`` holding a DataFrame indexed and columned
        by donor ID, such a DataFrame, or a GRM file path (see :func:`scverse_nullfit.io.read_grm`).
        Donors in the GRM without cells are ignored.
    covariates
        Columns of ``obs`` used as fixed effects (numeric, boolean or categorical; categoricals are one-hot
        encoded with the first level dropped). An intercept is always included. Columns that are constant or
        collinear with earlier ones are dropped with a warning.
    donor_covariates
        Covariates that must be constant within each donor (age, sex, genotype PCs); checked, and added to
        ``covariates`` if not already there.
    layer
        Layer to use instead of ``X``.
    genes
        The genes to fit: names, a boolean mask, or the name of a boolean column of ``var`` (e.g.
        ``"highly_variable"``); the others get NaN / ``converged=False``. Default: all genes.
    tau
        ``None`` estimates ``tau`` per gene by REML; a number fixes it for every gene (Gaussian only).
    family
        ``"gaussian"`` (REML on, e.g., log-normalised expression), ``"poisson"`` or ``"negative_binomial"``
        (raw counts: non-negative integers, in ``X`` or a layer such as ``"counts"``).
    offset
        Column of ``obs`` holding a log-scale offset per cell (e.g. log total counts), count families only.
    key_added
        Key under which results are stored in ``varm`` and ``uns``.
    groupby
        A column of ``obs`` (e.g. ``"cell_type"``): fit each group of cells separately, on its own cells and
        donors, and store group ``g``'s fit under ``f"{key_added}_{g}"`` (all of them on this AnnData, side by side;
        ``/`` in a label becomes ``_``). ``uns[...]["params"]`` records ``groupby`` and ``group``. Map each with
        ``cis_map(groupby=...)``. Donors without cells in a group are left out of its fit.
    {doc_n_threads}
    {doc_copy}

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``, with

    ``adata.varm[key_added]``
        DataFrame by gene: ``tau``, ``sigma2_g``, ``sigma2_e``, ``h2``, ``loglik`` (REML, the convention of
        statsmodels' ``MixedLM.fit(reml=True).llf``), ``converged``, ``n_iter``, ``h2_pval`` (REML likelihood-ratio
        test of ``tau > 0``, 50:50 mixture of chi2_0 and chi2_1), ``tau_se`` (observed information; NaN at ``tau = 0``),
        ``loglik_null`` (at ``tau = 0``).
    ``adata.varm[f"{key_added}_beta"]``
        Fixed effects (genes x covariates, named in ``uns[key_added]["covariate_names"]``).
    ``adata.varm[f"{key_added}_xhx_inv"]``, ``adata.varm[f"{key_added}_resid_rot"]``
        The per-gene part of the compact projection used by :func:`scverse_nullfit.tl.score_test`:
        ``(X'H^-1 X)^-1`` as its upper triangle row by row (genes x p (p + 1) / 2; every stored array is 2-D, so
        ``anndata.concat``, ``adata.T``, h5ad and zarr all work) and the rotated residual donor sums.
    ``adata.uns[key_added]``
        The shared part (donor order, cells per donor, eigenvalues, eigenvectors, rotated covariates,
        covariate names), ``params`` (everything needed to reproduce the call, with the package version, the
        ``family`` and the ``offset``), ``fit_id`` (unique to this fit; results derived from it record it) and
        ``cells`` (a fingerprint of the cells and their donors: tools and accessors refuse to use the fit on other,
        subset or reordered cells).

    For the count families the table's ``tau``, ``sigma2_e``, ``h2`` and ``tau_se`` are NaN; ``sigma2_g`` is the
    donor variance on the log scale, ``loglik`` the Laplace log-likelihood (lme4/glmmTMB convention),
    ``loglik_null`` the GLM's (``sigma2_g = 0``), ``h2_pval`` the likelihood-ratio test of ``sigma2_g > 0``
    (50:50 mixture), and further columns are ``theta`` (NB2 dispersion, NaN for Poisson), ``sigma2_g_se``
    (observed information; NaN at the boundary) and ``boundary`` (``sigma2_g = 0`` is the optimum). The compact
    projection of the working model (``xhx_inv``, ``resid_rot`` and ``f"{key_added}_working_weights"``,
    ``f"{key_added}_working_xw"``) serves :func:`~scverse_nullfit.tl.score_test` and
    :func:`~scverse_nullfit.tl.cis_map`.
    """
    if family not in ("gaussian", *Key.COUNT_FAMILIES):
        raise ValueError(f"family must be one of {['gaussian', *Key.COUNT_FAMILIES]}, not {family!r}.")
    if family == "gaussian" and offset is not None:
        raise ValueError("offset is for the count families (family='poisson' or 'negative_binomial').")
    if family != "gaussian" and tau is not None:
        raise ValueError("tau= fixes the Gaussian model's variance ratio; it has no meaning for count families.")
    if tau is not None and not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0 or None, not {tau!r}.")
    check_positive_int(n_threads, "n_threads")
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True needs the whole AnnData in memory, but adata is backed; load it (adata.to_memory()) or "
            "fit in place with copy=False (results are written to the in-memory varm/uns)."
        )
    check_unique_var_names(adata.var_names)
    if groupby is not None:
        return _fit_groups(adata, groupby, key_added, copy, layer, grm, kwargs=dict(
            donor_key=donor_key, grm=grm, covariates=covariates, donor_covariates=donor_covariates, layer=layer,
            genes=genes, tau=tau, family=family, offset=offset, n_threads=n_threads,
        ))  # fmt: skip
    n_threads = resolve_threads(n_threads)
    mask = select_genes(adata.var_names, genes, adata.var)
    adata = adata.copy() if copy else adata
    if family != "gaussian":
        _fit_counts(
            adata, donor_key=donor_key, grm=grm, covariates=covariates, donor_covariates=donor_covariates,
            layer=layer, genes=genes, mask=mask, family=family, offset=offset, key_added=key_added,
            n_threads=n_threads,
        )  # fmt: skip
        return adata if copy else None

    start = logg.info(f"fitting null models (key_added={key_added!r})")
    Y = get_expression(adata, layer)
    labels = donor_labels(adata.obs, donor_key)
    grm_df, grm_source = resolve_grm(adata, grm)
    G, donors = align_grm(grm_df, labels, grm_source)
    design = build_design(adata.obs, covariates, donor_covariates, donors)

    with threadpool_limits(limits=n_threads, user_api="blas"):
        fitted_idx = np.flatnonzero(mask)
        t2 = logg.debug(f"    stage 2: sufficient statistics of {len(fitted_idx)} genes ({describe_matrix(Y)})")
        pre, spectral, problem = _stage1_and_pass(Y, fitted_idx, donors, design.X, G, n_threads)
        logg.debug("    stage 2: sufficient statistics done", time=t2)

        ok_idx = np.flatnonzero(pre.ok)
        if len(ok_idx) < len(fitted_idx):
            logg.warning(
                f"{len(fitted_idx) - len(ok_idx)} genes are constant, non-finite or fully explained by the covariates; "
                "their results are NaN"
            )
        rotate = Rotation(spectral.U, scaled_residual_sums(pre, ok_idx))
        t3 = logg.debug("    stage 2: REML")
        show = settings.verbosity >= 2 and len(ok_idx) > 2000
        with tqdm(total=len(ok_idx), desc="genes", unit="gene", disable=not show) as bar:
            fits = fit_all_genes(
                problem, rotate, pre.W[ok_idx], tau=tau, distributed=is_dask(Y), n_threads=n_threads, progress=bar
            )
        logg.debug("    stage 2: REML done", time=t3)

    beta = fits.beta + pre.b0[ok_idx]
    beta[:, 0] += pre.mean[ok_idx]
    fitted = np.zeros(adata.n_vars, dtype=bool)
    fitted[fitted_idx[ok_idx]] = True
    table = results_frame(adata.var_names, fitted, fits)
    arrays = per_gene_arrays(adata.n_vars, fitted, fits, beta, key_added)
    params = _params(
        key_added, donor_key, grm, grm_df, covariates, donor_covariates, layer, genes, adata.var_names, mask,
        n_threads, Y, tau=tau, family="gaussian", offset=None, n_genes_fitted=int(fitted.sum()),
    )  # fmt: skip
    shared = shared_part(donors, design, spectral, params)
    projection = f"{Key.beta(key_added)!r}, {Key.xhx_inv(key_added)!r}, {Key.resid_rot(key_added)!r}, fixed effects "
    _finish(adata, key_added, table, arrays, shared, labels, donor_key, start, "per-gene variance components",
            projection + "and compact projection")  # fmt: skip
    return adata if copy else None


def _finish(adata, key_added, table, arrays, shared, labels, donor_key, start, per_gene: str, projection: str):
    """Record the fit's identity and cells, write everything at once, and log what was added."""
    shared[FIT_ID] = new_fit_id()
    shared[CELLS] = cell_fingerprint(adata.obs_names, labels, donor_key)
    store(adata, key_added, table, arrays, shared)
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    {key_added!r}, {per_gene} (adata.varm)\n    {projection} (adata.varm)\n"
            f"    {key_added!r}, shared donor-level part and parameters (adata.uns)"
        ),
    )


def _params(
    key_added,
    donor_key,
    grm,
    grm_df,
    covariates,
    donor_covariates,
    layer,
    genes,
    var_names,
    mask,
    n_threads,
    Y,
    **model,
) -> dict:
    """Everything needed to reproduce a fit, for ``uns[key_added]["params"]`` (``model``: tau, family, offset and
    the number of genes fitted)."""
    checksum = describe_frame(grm_df)  # hashes every GRM value: once
    return {
        "version": __version__,
        "key_added": key_added,
        "donor_key": donor_key,
        "grm": grm_param(grm, checksum),
        "grm_checksum": checksum,
        "covariates": as_list(covariates),
        "donor_covariates": as_list(donor_covariates),
        "layer": layer,
        "genes": _genes_param(genes, var_names, mask),
        "n_threads": n_threads,
        "n_genes_requested": int(mask.sum()),
        "input": describe_matrix(Y),
        **model,
    }


def _genes_param(genes, var_names: pd.Index, mask: np.ndarray):
    """How the gene selection is recorded in ``params``: ``None`` (all), a ``var`` column's name, or the names."""
    if genes is None or (isinstance(genes, str) and genes not in var_names):
        return genes
    return np.asarray(var_names[mask], dtype=object)


def _fit_groups(adata: AnnData, groupby: str, key_added: str, copy: bool, layer, grm, kwargs: dict) -> AnnData | None:
    """``fit_null`` on each group's cells; every group is fitted before anything is written to ``adata``."""
    keys = {group: group_key(key_added, group) for group in groups_of(adata, groupby)}
    names = [name for key in keys.values() for name in Key.null_varm(key)]
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(Key.null_varm(key_added))))
    if clash:
        raise ValueError(
            f"the groups of obs[{groupby!r}] give storage keys that collide ({clash[:3]}); rename the groups or "
            "choose another key_added."
        )
    fits = {}
    for group, cells, sub in fit_subsets(adata, groupby, layer, (grm,) if isinstance(grm, str) else ()):
        key = keys[group]
        logg.info(f"group {groupby}={group!r}: {len(cells)} cells")
        try:
            fit_null(sub, key_added=key, **kwargs)
        except (ValueError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
            raise type(err)(f"fitting the cells of obs[{groupby!r}] == {group!r}: {msg}") from err
        shared = dict(sub.uns[key])
        shared[Key.PARAMS] = {**shared[Key.PARAMS], "groupby": groupby, "group": group, "group_of": key_added}
        # the fit sits on the whole AnnData: its record describes all cells and which of them the group is
        shared[CELLS] = group_fingerprint(adata, kwargs["donor_key"], groupby, group)
        stored = Key.null_varm(key)
        fits[key] = ({name: sub.varm[name] for name in stored if name in sub.varm}, shared)
    target = adata.copy() if copy else adata
    for key, (varm, shared) in fits.items():
        for name, value in varm.items():
            target.varm[name] = value
        target.uns[key] = shared
    return target if copy else None


#: Stored non-zeros per batch of genes read for the count families.
COUNT_BATCH_NNZ = 1 << 21


def _offset_values(obs: pd.DataFrame, offset: str | None) -> np.ndarray:
    if offset is None:
        return np.zeros(len(obs))
    if not isinstance(offset, str):
        raise ValueError(f"offset names a column of adata.obs (a string), not {type(offset).__name__}.")
    if offset not in obs.columns:
        raise KeyError(f"offset {offset!r} is not a column of adata.obs (columns: {list(obs.columns)}).")
    col = obs[offset]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise ValueError(f"offset column {offset!r} must be numeric (a log-scale offset), not {col.dtype}.")
    return _glmm.check_offset(
        col.to_numpy(dtype=np.float64, na_value=np.nan), len(obs), f"offset column {offset!r}", obs.index
    )


def _gene_batches(Y, idx: np.ndarray) -> list[np.ndarray]:
    """Batches of the genes ``idx`` holding about ``COUNT_BATCH_NNZ`` stored values each (estimated)."""
    n_cells = Y.shape[0]
    per_gene = n_cells if not hasattr(Y, "nnz") else max(1, Y.nnz // max(1, Y.shape[1]))
    size = int(max(1, min(len(idx), COUNT_BATCH_NNZ // max(1, per_gene))))
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def _fit_counts(
    adata, *, donor_key, grm, covariates, donor_covariates, layer, genes, mask, family, offset, key_added, n_threads
) -> None:
    """The count families of :func:`fit_null` (Laplace ML; the maths is on the model page)."""
    start = logg.info(f"fitting {family} null models (key_added={key_added!r})")
    Y = get_expression(adata, layer)
    labels = donor_labels(adata.obs, donor_key)
    off = _offset_values(adata.obs, offset)
    grm_df, grm_source = resolve_grm(adata, grm)
    G, donors = align_grm(grm_df, labels, grm_source)
    design = build_design(adata.obs, covariates, donor_covariates, donors)
    fitted_idx = np.flatnonzero(mask)
    with threadpool_limits(limits=n_threads, user_api="blas"):
        spectral = spectral_precompute(G, donors, design.X)
        blocks = _glmm.donor_blocks(G, name=f"GRM from {grm_source}")
        logg.debug(f"    {len(donors.ids)} donors, GRM {blocks.kind} ({len(blocks.ptr) - 1} blocks)")
        if not _glmm.kernels_cached():
            logg.info(
                "    compiling the count kernels: once after installing or updating the package (about a minute); "
                "numba caches them for later runs"
            )
        n, p = len(donors.ids), design.X.shape[1]
        # the per-gene arrays, filled batch by batch (the genes not fitted: NaN); every stored array is 2-D (xhx_inv
        # packed, working_xw as genes x (donors p))
        arrays = {
            Key.beta(key_added): np.empty((adata.n_vars, p)),
            Key.xhx_inv(key_added): np.empty((adata.n_vars, p * (p + 1) // 2)),
            Key.resid_rot(key_added): np.empty((adata.n_vars, n)),
            Key.working_weights(key_added): np.empty((adata.n_vars, n)),
            Key.working_xw(key_added): np.empty((adata.n_vars, n * p)),
        }
        for arr in arrays.values():
            arr[~mask] = np.nan
        parts = []
        show = settings.verbosity >= 2 and len(fitted_idx) > 200
        # the cells' grouping and order depend on the design and the offset only: once for all batches
        groups = _glmm.count_groups(donors.codes, design.X, off, family, n)
        # each batch is read from the matrix as stored (an in-memory CSR matrix in one pass over it in all, without a
        # CSC copy of the whole matrix)
        reader = ColumnReader(Y)

        def load(batch):  # the batch in the kernels' layout once (the counts checked), for the fit and the working sums
            counts = reader(batch)
            layout = _glmm.count_layout(
                counts, donors.codes, design.X, off, family, n,
                gene_names=adata.var_names[batch], cell_names=adata.obs_names, groups=groups, n_threads=1,
            )  # fmt: skip
            return counts, layout

        batches = _gene_batches(Y, fitted_idx)
        # the next batch is read and laid out on one more thread while the threads fit this one (the reads are
        # single-threaded: a core would wait for them otherwise). Every step of the loop runs its kernels with one BLAS
        # thread; the limit is set here, on this thread, so that no thread raises it while another works (OpenBLAS
        # ignores a raise of its thread count made from a thread other than this one: measured)
        with (
            threadpool_limits(limits=1, user_api="blas"),
            tqdm(total=len(fitted_idx), desc="genes", unit="gene", disable=not show) as bar,
            ThreadPoolExecutor(1, "snf-read") as ahead,
        ):
            loading = ahead.submit(load, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                counts, layout = loading.result()
                loading = ahead.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
                fits = _glmm.fit_counts(
                    counts, donors.codes, design.X, family=family, offset=off, G=blocks, n_threads=n_threads,
                    gene_names=adata.var_names[batch], cell_names=adata.obs_names, layout=layout,
                )  # fmt: skip
                sums = _glmm.working_sums(
                    counts, donors.codes, design.X, off, fits, family, n_threads=n_threads, layout=layout
                )
                del counts, layout
                proj = _glmm.count_projection(sums, fits.sigma2_g, blocks, n_threads)
                del sums
                arrays[Key.beta(key_added)][batch] = fits.beta
                arrays[Key.xhx_inv(key_added)][batch] = pack_symmetric(proj.Ainv)
                arrays[Key.resid_rot(key_added)][batch] = proj.resid
                arrays[Key.working_weights(key_added)][batch] = proj.Dw
                arrays[Key.working_xw(key_added)][batch] = proj.B.reshape(len(batch), -1)
                del proj
                fits.u = np.empty((len(batch), 0))  # the modes are not stored: keep only the per-gene results
                parts.append(fits)
                bar.update(len(batch))
    fits = _glmm.concat_fits(parts, len(donors.ids), design.X.shape[1])
    n_bad = int((~fits.converged).sum())
    if n_bad:
        logg.warning(
            f"{n_bad} genes have no count model fit (all zeros, a single non-zero cell, or no convergence); "
            "their results are NaN"
        )
    fitted = np.zeros(adata.n_vars, dtype=bool)
    fitted[fitted_idx] = True
    table = count_results_frame(adata.var_names, fitted, fits)
    params = _params(
        key_added, donor_key, grm, grm_df, covariates, donor_covariates, layer, genes, adata.var_names, mask,
        n_threads, Y, tau=None, family=family, offset=offset, n_genes_fitted=int(fits.converged.sum()),
    )  # fmt: skip
    shared = shared_part(donors, design, spectral, params)
    shared[Key.GRM_BLOCKS] = blocks_part(blocks)
    projection = (
        f"{Key.beta(key_added)!r}, {Key.xhx_inv(key_added)!r}, {Key.resid_rot(key_added)!r}, "
        f"{Key.working_weights(key_added)!r}, {Key.working_xw(key_added)!r}, fixed effects and compact "
        "working-model projection"
    )
    _finish(adata, key_added, table, arrays, shared, labels, donor_key, start,
            "per-gene variance components and dispersions", projection)  # fmt: skip
