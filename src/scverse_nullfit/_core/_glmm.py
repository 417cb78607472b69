"""Count traits: Poisson and negative-binomial (NB2) mixed models fitted by Laplace maximum likelihood.

The objective is that of ``lme4::glmer(nAGQ=1)`` (Poisson) and glmmTMB's ``nbinom2`` (observed weights in the
log-determinant), with ``u ~ N(0, sigma2_g G)`` written as ``u = sigma L v``, ``G = L L'`` block by block (the
relmat construction of lme4qtl). Arrays in, arrays out; the AnnData plumbing lives in :mod:`scverse_nullfit.tl`.
The maths is in ``docs/model.md``.
"""

from __future__ import annotations

import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import linalg, sparse, stats
from scipy.sparse import csgraph
from threadpoolctl import ThreadpoolController

from . import _glmm_kernels as K
from ._compiled import cached_on_disk

FAMILIES = {"poisson": K.POISSON, "negative_binomial": K.NEGATIVE_BINOMIAL}


@dataclass
class DonorBlocks:
    """A donor covariance ``G`` as independent blocks, each with a square factor ``G_b = L_b L_b'``."""

    ptr: np.ndarray  #: (blocks + 1,) offsets into ``donors``
    donors: np.ndarray  #: (donors,) donor indices, grouped by block
    L: np.ndarray  #: flattened row-major factors, block after block
    loff: np.ndarray  #: (blocks,) offsets into ``L``

    @property
    def n_donors(self) -> int:
        return len(self.donors)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.ptr)

    @property
    def kind(self) -> str:
        sizes = self.sizes
        if (sizes == 1).all():
            return "diagonal"
        return "dense" if len(sizes) == 1 else "block-diagonal"


def donor_blocks(G: np.ndarray | None, n_donors: int | None = None, *, name: str = "GRM") -> DonorBlocks:
    """Split ``G`` into the connected components of its non-zero pattern and factor each block.

    ``G=None`` is the identity over ``n_donors`` donors. Each block is factored through its eigendecomposition
    (``L = U diag(sqrt(lam))``), so a positive semi-definite block works; negative eigenvalues are clipped to 0,
    with a warning when they are clearly negative.
    """
    if G is None:
        if n_donors is None:
            raise ValueError("donor_blocks needs G or n_donors.")
        n = int(n_donors)
        return DonorBlocks(np.arange(n + 1), np.arange(n), np.ones(n), np.arange(n))
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{name} must be a square matrix, not shape {G.shape}.")
    if not np.isfinite(G).all():
        raise ValueError(f"{name} has NaN or infinite entries.")
    n = G.shape[0]
    pattern = sparse.csr_matrix(G != 0)
    n_comp, labels = csgraph.connected_components(pattern, directed=False)
    order = np.argsort(labels, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_comp))])
    factors, loff, pos, worst = [], [], 0, 0.0
    for b in range(n_comp):
        idx = order[ptr[b] : ptr[b + 1]]
        Gb = G[np.ix_(idx, idx)]
        if len(idx) == 1:
            lam, U = Gb[0], np.ones((1, 1))
        else:
            try:
                lam, U = linalg.eigh((Gb + Gb.T) / 2, check_finite=False)
            except (linalg.LinAlgError, ValueError) as err:
                raise ValueError(
                    f"{name}: the eigendecomposition of a block of {len(idx)} donors failed ({err})."
                ) from err
        top = max(np.abs(lam).max(), 1e-300)
        worst = min(worst, lam.min() / top)
        Lb = U * np.sqrt(np.clip(lam, 0.0, None))
        factors.append(Lb.ravel())
        loff.append(pos)
        pos += Lb.size
    if worst < -1e-6:
        warnings.warn(
            f"{name} is not positive semi-definite (relative eigenvalue {worst:.3g}); clipped to 0.", stacklevel=2
        )
    return DonorBlocks(
        ptr.astype(np.int64), order.astype(np.int64), np.concatenate(factors), np.array(loff, dtype=np.int64)
    )


def sparsify_grm(G: np.ndarray, cutoff: float) -> np.ndarray:
    """Set the off-diagonal entries of ``G`` with ``|G_ij| < cutoff`` to zero, as SAIGE-QTL users do.

    This is a modelling choice of the user (donors less related than ``cutoff`` are treated as unrelated), not an
    approximation of the exact model with the dense GRM: the sparsified matrix defines its own model. It makes the
    fit block-diagonal (:func:`donor_blocks`), hence fast. The result may not be positive semi-definite; the
    block factorisation clips negative eigenvalues and warns.
    """
    G = np.array(G, dtype=np.float64)
    if not np.isfinite(cutoff) or cutoff < 0:
        raise ValueError(f"cutoff must be a finite number >= 0, not {cutoff!r}.")
    diag = np.diag(G).copy()
    G[np.abs(G) < cutoff] = 0.0
    np.fill_diagonal(G, diag)
    return G


@dataclass
class CountFits:
    """Per-gene results of the count GLMM (arrays over genes first)."""

    beta: np.ndarray  #: (genes, p)
    beta_se: np.ndarray  #: (genes, p)
    sigma2_g: np.ndarray
    sigma2_g_se: np.ndarray
    theta: np.ndarray  #: NaN for the Poisson family
    loglik: np.ndarray  #: Laplace log-likelihood (lme4/glmmTMB convention)
    loglik0: np.ndarray  #: log-likelihood at sigma2_g = 0 (the GLM)
    converged: np.ndarray
    boundary: np.ndarray  #: sigma2_g = 0 is the optimum
    n_iter: np.ndarray
    u: np.ndarray  #: (genes, donors) mode of the donor effects

    @property
    def lrt(self) -> np.ndarray:
        return np.where(self.converged, np.maximum(2.0 * (self.loglik - self.loglik0), 0.0), np.nan)

    @property
    def pval(self) -> np.ndarray:
        """Likelihood-ratio p-value of sigma2_g > 0 under the 50:50 mixture of chi2_0 and chi2_1."""
        lrt = self.lrt
        return np.where(np.isfinite(lrt), np.where(lrt > 0, 0.5 * stats.chi2.sf(lrt, 1), 1.0), np.nan)


def check_counts(Y, gene_names=None, cell_names=None) -> None:
    """Raise a ValueError naming a gene and a cell when counts are negative, non-integer or non-finite."""
    M = Y.tocsc() if sparse.issparse(Y) else np.asarray(Y)
    data = M.data if sparse.issparse(M) else M
    bad = ~np.isfinite(data) | (data < 0) | (data != np.round(data))
    if not bad.any():
        return
    if sparse.issparse(M):
        k = int(np.flatnonzero(bad)[0])
        gene = int(np.searchsorted(M.indptr, k, side="right") - 1)
        cell = int(M.indices[k])
        value = M.data[k]
    else:
        cell, gene = (int(i) for i in np.argwhere(bad)[0])
        value = M[cell, gene]
    gname = gene_names[gene] if gene_names is not None else gene
    cname = cell_names[cell] if cell_names is not None else cell
    what = "non-finite" if not np.isfinite(value) else ("negative" if value < 0 else "non-integer")
    raise ValueError(
        f"count families need raw counts, but gene {gname!r} has a {what} value ({value!r}) in cell {cname!r} "
        f"({int(bad.sum())} such values in all)."
    )


def check_offset(offset, n_cells: int, name: str = "offset", cell_names=None) -> np.ndarray:
    """The offset as float64, rejecting a wrong length or non-finite values (naming a cell)."""
    if offset is None:
        return np.zeros(n_cells)
    off = np.asarray(offset, dtype=np.float64).ravel()
    if off.shape != (n_cells,):
        raise ValueError(f"{name} has {off.size} values but there are {n_cells} cells.")
    bad = ~np.isfinite(off)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cname = cell_names[i] if cell_names is not None else i
        raise ValueError(f"{name} is non-finite in {int(bad.sum())} cells (first: {cname!r}, value {off[i]!r}).")
    return off


def _as_csc(Y) -> sparse.csc_matrix:
    if sparse.issparse(Y):
        M = sparse.csc_matrix(Y)
    else:
        M = sparse.csc_matrix(np.asarray(Y))
    M.sum_duplicates()
    M.sort_indices()
    return M


def _row_groups(codes, X) -> np.ndarray:
    """The group of each cell: cells sharing a donor and a design row, numbered donor-major (donor, then rows)."""
    key = np.asarray(codes, dtype=np.int64)
    for j in range(X.shape[1]):
        col = X[:, j]
        if col.size == 0 or (col == col[0]).all():
            continue
        cj, uniq = pd.factorize(col, sort=True)
        if len(uniq) > 1:
            key = key * len(uniq) + cj
            _, key = np.unique(key, return_inverse=True)
    return np.unique(key, return_inverse=True)[1].ravel().astype(np.int64)


def _poisson_collapse(codes, X, offset):
    """The gene-independent part of :func:`_poisson_groups`: each cell's group, each group's first cell and
    ``log S_g``; None when the design leaves too few repeated rows to gain from it."""
    group = _row_groups(codes, X)
    N = len(codes)
    n_groups = int(group.max()) + 1 if N else 0
    if n_groups > N // 2:
        return None
    first = np.full(n_groups, N, dtype=np.int64)
    np.minimum.at(first, group, np.arange(N))
    shift = offset.max() if N else 0.0
    logS = np.log(np.bincount(group, weights=np.exp(offset - shift), minlength=n_groups)) + shift
    return group, first, logS


def _poisson_groups(Y, codes, X, offset, collapse=None):
    """Collapse the cells sharing a donor and a design row, for the Poisson family (see ``docs/model.md``).

    ``mu_c = exp(o_c) exp(x_c'b + u_d)``, so the cells of a (donor, design row) group enter the log-likelihood
    only through their summed counts and ``S_g = sum exp(o_c)``: the group is one "cell" with offset ``log S_g``.
    The estimates, the mode and every donor sum are unchanged; the log-likelihood moves by a per-gene constant.
    Returns the groups' counts (CSC, groups x genes) and that constant, to be added back; None when the design leaves
    too few repeated rows to gain from it (the groups' codes, design rows and offsets are gene-independent: see
    :func:`count_groups`). ``collapse``: the gene-independent part (:func:`_poisson_collapse`), when the caller has
    it.
    """
    if collapse is None:
        collapse = _poisson_collapse(codes, X, offset)
        if collapse is None:
            return None
    group, first, logS = collapse
    M = _as_csc(Y)
    off = np.ascontiguousarray(offset, dtype=np.float64)
    gptr, gidx, gdat, const = K.collapse_counts(
        M.indptr.astype(np.int64), M.indices, M.data, group, len(first), off,
        logS,
    )  # fmt: skip
    return sparse.csc_matrix((gdat, gidx, gptr), shape=(len(first), M.shape[1])), const


def _cell_layout(codes, X, offset, n_donors: int, group: np.ndarray | None = None):
    """The gene-independent part of :func:`_by_donor`: the position of each cell in the group order (None: the
    cells are in it already) and each cell's group, then codes, design, offset and the groups' tuple in that
    order. ``group``: each cell's group when the caller knows it (:func:`_row_groups` otherwise)."""
    group = _row_groups(codes, X) if group is None else group
    inv = None
    ogroup = group
    if (np.diff(group) < 0).any():
        order = np.argsort(group, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        codes, X, offset, group = codes[order], X[order], offset[order], group[order]
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    X = np.ascontiguousarray(X, dtype=np.float64)
    offset = np.ascontiguousarray(offset, dtype=np.float64)
    N = len(codes)
    sizes = np.bincount(group)
    gptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    first = gptr[:-1]
    gdon = codes[first]
    dgptr = np.searchsorted(gdon, np.arange(n_donors + 1)).astype(np.int64)
    Xg = np.ascontiguousarray(X[first])
    if N:
        oref = np.maximum.reduceat(offset, first)
        sig = np.exp(offset - oref[group])
        smin = np.minimum.reduceat(sig, first)
        S1 = np.add.reduceat(sig, first)
    else:
        oref = sig = smin = S1 = np.zeros(0)
    s0, hh = (1.0 + smin) / 2.0, (1.0 - smin) / 2.0
    multi = np.flatnonzero((sizes > 1) & (hh > 0))
    midx = np.full(len(sizes), -1, dtype=np.int64)
    midx[multi] = np.arange(len(multi))
    mom = K.group_moments(gptr, sig, s0, multi.astype(np.int64), K.SERIES_TERMS)
    grp = (gptr, group.astype(np.int64), dgptr, Xg, oref, sig, s0, hh, S1, mom, midx)
    return inv, ogroup, codes, X, offset, grp


def _by_donor(Y, codes, X, offset, n_donors: int, cells=None, n_threads: int = 1):
    """Counts (CSC, float64), codes, design and offset with the cells sorted by group (cells sharing a donor and
    a design row, donor-major: the kernels' layout), and the groups as the tuple the kernels take: (cell
    pointers, group of each cell, donor pointers into the groups, design rows, reference offset ``oref`` (the
    group's largest), ``s_c = exp(o_c - oref)`` per cell, centre ``s0`` and half-range ``hh`` of the group's
    ``s_c``, ``S1 = sum s_c``, moments ``sum (s_c - s0)^k`` of the groups with spread, and each group's row in
    them (-1: none)). ``cells``: the gene-independent part (:func:`_cell_layout`), when the caller has it;
    ``n_threads``: threads over genes for the regrouping."""
    M = _as_csc(Y)
    if cells is None:
        cells = _cell_layout(codes, X, offset, n_donors)
    inv, ogroup, codes, X, offset, grp = cells
    indptr = M.indptr.astype(np.int64)
    if inv is None:
        indices, data = M.indices.astype(np.int64), M.data.astype(np.float64, copy=False)
    else:  # new arrays: the caller's Y is left untouched
        indices, data = np.empty(indptr[-1], dtype=np.int64), np.empty(indptr[-1])

        def work(lo_hi):
            K.regroup_columns_range(*lo_hi, indptr, M.indices, M.data, inv, ogroup, len(grp[0]) - 1, indices, data)

        _run_ranges(work, len(indptr) - 1, n_threads, max_chunk=1 << 30)
    return indptr, indices, data, codes, X, offset, grp


@dataclass
class CountGroups:
    """The gene-independent part of the kernels' layout of a fit (see :func:`count_groups`)."""

    collapse: tuple | None  #: the Poisson grouping (:func:`_poisson_collapse`), or None
    cells: tuple  #: the (collapsed) cells' layout (:func:`_cell_layout`)


def count_groups(codes, X, offset, family: str, n_donors: int, *, collapse: bool = True) -> CountGroups:
    """The cells' grouping, order and group sums, which depend on the design and the offset only: built once per
    fit and given to :func:`count_layout` for every batch of genes."""
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    X = np.ascontiguousarray(X, dtype=np.float64)
    offset = np.ascontiguousarray(offset, dtype=np.float64)
    col = _poisson_collapse(codes, X, offset) if FAMILIES[family] == K.POISSON and collapse else None
    if col is None:
        return CountGroups(None, _cell_layout(codes, X, offset, n_donors))
    _, first, logS = col  # each collapsed group is one cell, already in donor-major group order
    return CountGroups(col, _cell_layout(codes[first], X[first], logS, n_donors, np.arange(len(first))))


@dataclass
class CountLayout:
    """The counts of a batch of genes in the kernels' layout (see :func:`count_layout`)."""

    arrays: tuple  #: (indptr, indices, data, codes, X, offset, groups) from :func:`_by_donor`
    const: np.ndarray | float  #: per-gene log-likelihood constant of the Poisson grouping (0 otherwise)

    @property
    def n_genes(self) -> int:
        return len(self.arrays[0]) - 1


def count_layout(
    Y,
    codes,
    X,
    offset,
    family: str,
    n_donors: int,
    *,
    collapse: bool = True,
    gene_names=None,
    cell_names=None,
    groups: CountGroups | None = None,
    n_threads: int = 1,
) -> CountLayout:
    """Counts, codes, design and offset in the kernels' layout, once for :func:`fit_counts` and
    :func:`working_sums` of the same batch; the counts are checked first (:func:`check_counts`, naming a gene and a
    cell). ``collapse``: for the Poisson family, cells sharing a donor and a design row as one group (exact; see
    :func:`_poisson_groups`). ``groups``: the fit's :func:`count_groups` (built here otherwise); ``n_threads``: threads
    over genes."""
    check_counts(Y, gene_names, cell_names)
    if groups is None:
        groups = count_groups(codes, X, offset, family, n_donors, collapse=collapse)
    M = _as_csc(Y)
    const = 0.0
    if groups.collapse is not None:
        M, const = _poisson_groups(M, codes, X, offset, groups.collapse)
    return CountLayout(_by_donor(M, None, None, None, n_donors, groups.cells, n_threads), const)


def kernels_cached() -> bool:
    """Whether the count kernels are compiled or cached already (False: the first fit compiles them)."""
    return cached_on_disk(K.fit_genes_range)


@functools.cache
def _threadpools() -> ThreadpoolController:
    """The process's thread pools (BLAS, OpenMP), found once: a fresh ``threadpool_limits`` scans the loaded
    libraries every time (about 4 ms, several times per batch of genes)."""
    return ThreadpoolController()


def _run_ranges(work, genes: int, n_threads: int, max_chunk: int) -> None:
    """Run ``work((lo, hi))`` over ranges of genes in ``n_threads`` threads (the kernels release the GIL), with
    BLAS itself single-threaded: the kernels' small dense algebra is far slower with threaded BLAS."""
    ranges = []
    lo = 0
    while lo < genes:  # guided: each range about the work left over twice the threads, so that the threads end together
        size = max(1, min(max_chunk, -(-(genes - lo) // max(1, 2 * n_threads))))
        ranges.append((lo, lo + size))
        lo += size
    with _threadpools().limit(limits=1, user_api="blas"):
        if n_threads > 1 and len(ranges) > 1:
            with ThreadPoolExecutor(n_threads) as ex:
                list(ex.map(work, ranges))
        else:
            for r in ranges:
                work(r)


def fit_counts(
    Y,
    codes: np.ndarray,
    X: np.ndarray,
    *,
    family: str = "poisson",
    offset: np.ndarray | None = None,
    G: np.ndarray | DonorBlocks | None = None,
    n_donors: int | None = None,
    n_threads: int = 1,
    gene_names=None,
    cell_names=None,
    collapse: bool = True,
    layout: CountLayout | None = None,
) -> CountFits:
    """Fit the count GLMM of every column of ``Y`` (cells x genes: counts, dense or scipy sparse).

    Parameters
    ----------
    Y
        Raw counts, cells x genes.
    codes
        Each cell's donor index (0 .. donors-1), in the order of ``G``.
    X
        Design (cells x p), intercept included, full column rank.
    family
        ``"poisson"`` or ``"negative_binomial"`` (NB2, per-gene theta).
    offset
        Log-scale offset per cell (default 0).
    G
        The donor covariance: ``None`` (identity), a dense matrix (split into blocks by its zero pattern), or
        :class:`DonorBlocks`.
    n_donors
        Number of donors when ``G`` is None (default ``codes.max() + 1``).
    n_threads
        Threads over genes.
    gene_names, cell_names
        Used in error messages.
    collapse
        For the Poisson family, fit cells that share a donor and a design row as one group (exact; see
        :func:`_poisson_groups`).
    layout
        The batch's :func:`count_layout` (which checks the counts), when the caller has it; built here otherwise.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)} for count models, not {family!r}.")
    fam = FAMILIES[family]
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    N = codes.shape[0]
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != N:
        raise ValueError(f"design has shape {X.shape}, expected ({N}, p).")
    if Y.shape[0] != N:
        raise ValueError(f"counts have {Y.shape[0]} cells, the donor codes {N}.")
    off = check_offset(offset, N, cell_names=cell_names)
    if isinstance(G, DonorBlocks):
        blocks = G
    else:
        if n_donors is None:
            n_donors = int(codes.max()) + 1 if G is None else np.asarray(G).shape[0]
        blocks = donor_blocks(G, n_donors)
    n = blocks.n_donors
    if N and (codes.min() < 0 or codes.max() >= n):
        raise ValueError(f"donor codes must lie in 0..{n - 1}.")
    if layout is None:
        layout = count_layout(
            Y, codes, X, off, family, n, collapse=collapse, gene_names=gene_names, cell_names=cell_names
        )
    indptr, indices, data, codes_s, X_s, off_s, grp = layout.arrays
    genes = layout.n_genes
    p = X.shape[1]
    beta = np.full((genes, p), np.nan)
    s2 = np.full(genes, np.nan)
    theta = np.full(genes, np.nan)
    ll = np.full(genes, np.nan)
    ll0 = np.full(genes, np.nan)
    status = np.full(genes, K.FAILED, dtype=np.int64)
    iters = np.zeros(genes, dtype=np.int64)
    se = np.full((genes, p + 2), np.nan)
    u = np.full((genes, n), np.nan)

    consts = K.fit_constants(off_s, X_s, grp)

    def work(lo_hi):
        lo, hi = lo_hi
        K.fit_genes_range(
            fam, lo, hi, indptr, indices, data, codes_s, off_s, X_s, grp, blocks.ptr, blocks.donors, blocks.L,
            blocks.loff, beta, s2, theta, ll, ll0, status, iters, se, u, consts,
        )  # fmt: skip

    _run_ranges(work, genes, n_threads, max_chunk=8)  # small ranges: the threads finish a batch together
    bad = status == K.FAILED  # failed fits, and genes with fewer than two non-zero cells (or groups)
    converged = ~bad
    for arr in (beta, se, u):
        arr[bad] = np.nan
    for arr in (s2, theta, ll, ll0):
        arr[bad] = np.nan
    if fam == K.POISSON:
        theta[:] = np.nan
    ll += layout.const
    ll0 += layout.const
    s2_se = s2 * se[:, p]
    return CountFits(
        beta=beta,
        beta_se=se[:, :p],
        sigma2_g=s2,
        sigma2_g_se=s2_se,
        theta=theta,
        loglik=ll,
        loglik0=ll0,
        converged=converged,
        boundary=converged & (status == K.BOUNDARY),
        n_iter=iters,
        u=u,
    )


# ------------------------------------------------------------------------------------------------------------
# step 2: the working model at the fit (SAIGE-QTL / GMMAT), Sigma = W^-1 + s2 Z G Z', through donor sums only
# ------------------------------------------------------------------------------------------------------------

#: Float64 elements of the temporaries of one gene chunk of the projection and the block algebra (32 MB).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class CountProjection:
    """The compact projection of the count working model, per gene (genes first; no donors x donors per gene).

    For a donor-level genotype ``g`` (cells ``Zg``): ``score = g' resid``, and ``score_var = g'T D_w g -
    (B'g)' Ainv (B'g)`` where ``g'T D_w g`` is rebuilt from ``Dw`` and ``sigma2_g`` block by block.
    """

    sigma2_g: np.ndarray  #: (genes,)
    Dw: np.ndarray  #: (genes, donors) donor sums of the working weights
    B: np.ndarray  #: (genes, donors, p) T Z'WX
    Ainv: np.ndarray  #: (genes, p, p) (X' Sigma^-1 X)^-1
    resid: np.ndarray  #: (genes, donors) T (Z'Wr - Z'WX Ainv X'Sigma^-1 r): the donor sums of P y~


def working_sums(
    Y, codes, X, offset, fits: CountFits, family: str, n_threads: int = 1, *, layout: CountLayout | None = None
) -> dict[str, np.ndarray]:
    """Donor-level sums of the working model at the fits (see :func:`_glmm_kernels.working_sums_range`);
    ``layout``: the batch's :func:`count_layout`, as given to :func:`fit_counts` (built here otherwise)."""
    fam = FAMILIES[family]
    n = fits.u.shape[1]
    if layout is None:
        off = check_offset(offset, X.shape[0])
        codes, X = np.asarray(codes), np.asarray(X, dtype=np.float64)
        layout = count_layout(Y, codes, X, off, family, n)
    indptr, indices, data, codes, X, off, grp = layout.arrays
    genes, p = len(indptr) - 1, X.shape[1]
    out = {
        "Dw": np.zeros((genes, n)),
        "ZWX": np.zeros((genes, n, p)),
        "XWX": np.zeros((genes, p, p)),
        "ZWr": np.zeros((genes, n)),
        "XWr": np.zeros((genes, p)),
    }
    theta = fits.theta if fam == K.NEGATIVE_BINOMIAL else np.full(genes, np.inf)

    def work(lo_hi):
        K.working_sums_range(
            fam,
            lo_hi[0],
            lo_hi[1],
            indptr,
            indices,
            data,
            codes,
            off,
            X,
            grp,
            fits.beta,
            fits.u,
            theta,
            out["Dw"],
            out["ZWX"],
            out["XWX"],
            out["ZWr"],
            out["XWr"],
        )

    _run_ranges(work, genes, n_threads, max_chunk=1024)
    bad = ~fits.converged
    for v in out.values():
        v[bad] = np.nan
    return out


@dataclass
class BlockGroup:
    """The multi-donor blocks of a :class:`DonorBlocks` that share a size ``k``, stacked for batched algebra."""

    idx: np.ndarray  #: (blocks, k) donor indices
    L: np.ndarray  #: (blocks, k, k) factors, ``G_b = L_b L_b'``

    @property
    def size(self) -> int:
        return self.idx.shape[1]


def _split_blocks(blocks: DonorBlocks):
    """Singleton donors as arrays (donor index, G_dd), and the larger blocks grouped by size
    (a list of :class:`BlockGroup`)."""
    sizes = blocks.sizes
    single = np.flatnonzero(sizes == 1)
    d1 = blocks.donors[blocks.ptr[single]]
    g1 = blocks.L[blocks.loff[single]] ** 2
    groups = []
    for k in np.unique(sizes[sizes > 1]):
        which = np.flatnonzero(sizes == k)
        idx = blocks.donors[blocks.ptr[which][:, None] + np.arange(k)[None, :]]
        L = blocks.L[blocks.loff[which][:, None] + np.arange(k * k)[None, :]].reshape(len(which), k, k)
        groups.append(BlockGroup(idx, L))
    return d1, g1, groups


def _gene_step(per_gene: int) -> int:
    """Genes per chunk so that ``per_gene`` float64 elements per gene stay near ``CHUNK_ELEMENTS``."""
    return int(max(1, CHUNK_ELEMENTS // max(1, per_gene)))


def block_solve(Dw: np.ndarray, s2: np.ndarray, grp: BlockGroup, H: np.ndarray) -> np.ndarray:
    """``K_b^-1 H_b`` for every gene and block of ``grp``, ``K_b = I + s2 L_b' diag(Dw_b) L_b``.

    ``Dw`` (genes, donors), ``s2`` (genes,), ``H`` (genes, blocks, k, m). One batched ``np.linalg.solve`` per
    chunk of genes (``K_b`` is symmetric with eigenvalues >= 1, so the LU solve is as good as Cholesky). Donor
    sums that are not finite (genes without a fit) enter ``K_b`` as 0; their ``H`` carries the NaN.
    """
    nb, k = grp.idx.shape
    out = np.empty(H.shape)
    LT = grp.L.transpose(0, 2, 1)
    diag = np.arange(k)
    step = _gene_step(nb * k * (2 * k + H.shape[-1]))
    for lo in range(0, len(s2), step):
        sl = slice(lo, lo + step)
        D = Dw[sl][:, grp.idx]
        D[~np.isfinite(D)] = 0.0
        Kb = np.matmul(LT[None] * D[:, :, None, :], grp.L[None])
        Kb *= s2[sl, None, None, None]
        Kb[..., diag, diag] += 1.0
        out[sl] = np.linalg.solve(Kb, H[sl])
    return out


def block_quad(Dw: np.ndarray, s2: np.ndarray, groups: list[BlockGroup], G: np.ndarray) -> np.ndarray:
    """``s2 h' K_b^-1 h`` summed over the multi-donor blocks, ``h = L_b' diag(Dw_b) g_b``, for every gene
    (``Dw`` genes x donors, ``s2`` genes) and column of ``G`` (donors x variants): the block part of
    ``g' D_w g - g' T D_w g``. Returns genes x variants (zeros without multi-donor blocks)."""
    genes, V = len(s2), G.shape[1]
    out = np.zeros((genes, V))
    for grp in groups:
        nb, k = grp.idx.shape
        Gb = G[grp.idx]  # (blocks, k, V)
        LT = grp.L.transpose(0, 2, 1)[None]
        step = _gene_step(nb * k * (2 * k + 3 * V))
        for lo in range(0, genes, step):
            sl = slice(lo, lo + step)
            h = np.matmul(LT, Dw[sl][:, grp.idx, None] * Gb[None])
            out[sl] += s2[sl, None] * np.einsum("gbkv,gbkv->gv", h, block_solve(Dw[sl], s2[sl], grp, h))
    return out


def count_projection(
    sums: dict[str, np.ndarray], sigma2_g: np.ndarray, blocks: DonorBlocks, n_threads: int = 1
) -> CountProjection:
    """The compact projection from the working sums: ``T = I - s2 D_w L K^-1 L'``, ``K = I + s2 L' D_w L``.

    Chunk by chunk of genes (bounded temporaries; ``n_threads`` chunks at a time); singleton donors for all genes of
    a chunk at once, blocks of related donors through :func:`block_solve`. The working sums are consumed:
    ``sums["ZWX"]`` becomes ``B`` (overwritten in place, so no second genes x donors x p array is allocated).
    """
    Dw, ZWX, XWX, ZWr, XWr = (sums[k] for k in ("Dw", "ZWX", "XWX", "ZWr", "XWr"))
    genes, n, p = ZWX.shape
    s2 = np.where(np.isfinite(sigma2_g), sigma2_g, 0.0)
    d1, g1, groups = _split_blocks(blocks)
    Ainv = np.full((genes, p, p), np.nan)
    resid = np.empty((genes, n))

    def work(lo_hi):
        sl = slice(*lo_hi)
        _project_chunk(Dw[sl], ZWX[sl], XWX[sl], ZWr[sl], XWr[sl], s2[sl], d1, g1, groups, Ainv[sl], resid[sl])

    step = _gene_step(3 * n * (p + 1))
    _run_ranges(work, genes, n_threads, max_chunk=step if n_threads > 1 else max(step, genes))
    return CountProjection(sigma2_g=s2, Dw=Dw, B=ZWX, Ainv=Ainv, resid=resid)


def _project_chunk(Dw, ZWX, XWX, ZWr, XWr, s2, d1, g1, groups, Ainv, resid) -> None:
    """:func:`count_projection` of one chunk of genes: fills ``Ainv`` and ``resid``, turns ``ZWX`` into ``B``."""
    p = ZWX.shape[2]
    R = np.concatenate([ZWX, ZWr[:, :, None]], axis=2)  # [Z'WX, Z'Wr]
    LKL = np.empty_like(R)  # L K^-1 L' R
    kinv = g1 / (1.0 + s2[:, None] * g1 * Dw[:, d1])
    LKL[:, d1] = kinv[:, :, None] * R[:, d1]
    for grp in groups:
        H = np.matmul(grp.L.transpose(0, 2, 1)[None], R[:, grp.idx])
        LKL[:, grp.idx] = np.matmul(grp.L[None], block_solve(Dw, s2, grp, H))
    M = np.matmul(ZWX.transpose(0, 2, 1), LKL)  # (k, p, p + 1): Z'WX' L K^-1 L' [Z'WX, Z'Wr]
    A = XWX - s2[:, None, None] * M[:, :, :p]
    xsr = XWr - s2[:, None] * M[:, :, p]
    ok = np.isfinite(A).all(axis=(1, 2))
    if ok.any():
        Ainv[ok] = np.linalg.pinv(A[ok], hermitian=True)
    # T R = R - s2 D_w L K^-1 L' R, in place in LKL
    LKL *= (-s2[:, None] * Dw)[:, :, None]
    LKL += R
    ZWX[...] = LKL[:, :, :p]
    resid[...] = LKL[:, :, p] - np.matmul(ZWX, np.matmul(Ainv, xsr[:, :, None]))[:, :, 0]


def count_score(proj: CountProjection, genotypes: np.ndarray, blocks: DonorBlocks, gene):
    """Score statistics of donor-level variants (donors x variants) for the gene ``gene`` (an index: returns
    (score, score_var), each over variants) or genes (an array or slice: each genes x variants)."""
    g = np.asarray(genotypes, dtype=np.float64)
    if g.ndim == 1:
        g = g[:, None]
    rows = np.atleast_1d(np.arange(len(proj.sigma2_g))[gene])
    s2, Dw = proj.sigma2_g[rows], proj.Dw[rows]
    d1, g1, groups = _split_blocks(blocks)
    tdw = Dw.copy()  # the diagonal of T D_w on singleton donors; the blocks come from block_quad
    tdw[:, d1] = Dw[:, d1] / (1.0 + s2[:, None] * g1 * Dw[:, d1])
    score = proj.resid[rows] @ g
    quad = tdw @ (g * g) - block_quad(Dw, s2, groups, g)
    Bg = np.matmul(proj.B[rows].transpose(0, 2, 1), g[None])  # (genes, p, variants)
    var = quad - np.einsum("gpm,gpm->gm", Bg, np.matmul(proj.Ainv[rows], Bg))
    if np.ndim(gene) == 0 and not isinstance(gene, slice):
        return score[0], var[0]
    return score, var


def concat_fits(parts: list[CountFits], n_donors: int, p: int) -> CountFits:
    """Fits of consecutive gene batches as one :class:`CountFits`."""
    if not parts:
        e1 = np.zeros(0)
        return CountFits(
            np.zeros((0, p)),
            np.zeros((0, p)),
            e1,
            e1,
            e1,
            e1,
            e1,
            np.zeros(0, bool),
            np.zeros(0, bool),
            np.zeros(0, np.int64),
            np.zeros((0, n_donors)),
        )
    return CountFits(**{f: np.concatenate([getattr(x, f) for x in parts]) for f in CountFits.__dataclass_fields__})
