"""Step 1 of the pipeline: where the expression matrix and the GRM come from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:
    from anndata import AnnData

#: Target size, in float64 elements, of one block of the expression matrix held in memory at a time.
BLOCK_ELEMENTS = 1 << 23


def get_expression(adata: AnnData, layer: str | None):
    """Return the expression matrix (cells x genes) without copying or loading it."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; pass `layer=` to name the layer that holds expression.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())}).")
    return adata.layers[layer]


def _is_dask(Y) -> bool:
    return type(Y).__module__.startswith("dask.")


def _is_sparse(Y) -> bool:
    return sparse.issparse(Y)


def _is_backed_sparse(Y) -> bool:
    # anndata's on-disk CSR/CSC datasets (backed mode or ``sparse_dataset``)
    return hasattr(Y, "format") and hasattr(Y, "to_memory") and not _is_sparse(Y)


def describe_matrix(Y) -> str:
    """A short human-readable description of the input's storage, for logs and params."""
    if _is_dask(Y):
        return "dask"
    if _is_backed_sparse(Y):
        return f"backed {Y.format}"
    if _is_sparse(Y):
        return Y.format
    if hasattr(Y, "id") and hasattr(Y, "file"):  # h5py.Dataset
        return "backed dense"
    return "dense"


def iter_blocks(Y, genes: np.ndarray, *, block_elements: int = BLOCK_ELEMENTS) -> Iterator[tuple[slice, slice, object]]:
    """Yield ``(cell_slice, gene_slice, block)`` covering ``Y[:, genes]``.

    Blocks are numpy arrays or CSR matrices, sized to about ``block_elements`` entries. Gene slices index
    into ``genes``. Row-major storage (dense, CSR, backed, dask) is read in cell chunks with all requested
    genes; column-major storage (CSC) is read in gene chunks with all cells, each converted to CSR.
    """
    n_cells = Y.shape[0]
    n_genes = len(genes)
    all_genes = n_genes == Y.shape[1] and np.array_equal(genes, np.arange(Y.shape[1]))

    if _is_sparse(Y) and Y.format == "csc":
        step = max(1, block_elements // max(n_cells, 1))
        for g0 in range(0, n_genes, step):
            g1 = min(n_genes, g0 + step)
            block = Y[:, genes[g0:g1]].tocsr()
            yield slice(0, n_cells), slice(g0, g1), block
        return

    if _is_dask(Y):
        chunks = Y.chunks[0]
        starts = np.concatenate([[0], np.cumsum(chunks)])
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            block = Y[int(a) : int(b)]
            if not all_genes:
                block = block[:, genes]
            block = block.compute()
            yield slice(int(a), int(b)), slice(0, n_genes), _as_block(block)
        return

    step = max(1, block_elements // max(n_genes, 1))
    if _is_sparse(Y) or _is_backed_sparse(Y):
        # sparse rows are cheap: size the step by the non-zeros instead of the dense size
        nnz = Y.nnz if _is_sparse(Y) else int(Y.group["indptr"][-1]) if hasattr(Y, "group") else None
        if nnz:
            density = nnz / max(n_cells * Y.shape[1], 1)
            step = max(step, int(block_elements // max(n_genes * max(density, 1e-6), 1)))
    for a in range(0, n_cells, step):
        b = min(n_cells, a + step)
        block = Y[a:b]
        block = _as_block(block)
        if not all_genes:
            block = block[:, genes]
        yield slice(a, b), slice(0, n_genes), block


def _as_block(block):
    if _is_sparse(block):
        return block.tocsr() if block.format != "csr" else block
    if hasattr(block, "todense") and not isinstance(block, np.ndarray):  # e.g. sparse arrays from dask
        block = block.todense()
    return np.asarray(block)


def resolve_grm(adata: AnnData, grm) -> tuple[pd.DataFrame, str]:
    """Turn the ``grm`` argument into a DataFrame indexed and columned by donor ID, and describe its source."""
    if isinstance(grm, pd.DataFrame):
        return grm, "DataFrame"
    if isinstance(grm, np.ndarray):
        raise ValueError(
            "grm is a bare numpy array; pass a DataFrame indexed and columned by donor ID so donors can be matched."
        )
    if isinstance(grm, str) and grm in adata.uns:
        value = adata.uns[grm]
        if not isinstance(value, pd.DataFrame):
            raise ValueError(
                f"adata.uns[{grm!r}] is a {type(value).__name__}, not a DataFrame indexed and columned by donor ID."
            )
        return value, f"adata.uns[{grm!r}]"
    if isinstance(grm, str | os.PathLike):
        from ..io import read_grm

        path = Path(grm)
        if isinstance(grm, str) and os.sep not in grm and "." not in path.name and not _grm_prefix_exists(path):
            raise KeyError(
                f"grm={grm!r} is neither a key of adata.uns (keys: {list(adata.uns.keys())}) nor an existing GRM file."
            )
        return read_grm(path), str(path)
    raise ValueError(f"grm must be a key of adata.uns, a DataFrame or a path, not {type(grm).__name__}.")


def _grm_prefix_exists(path: Path) -> bool:
    return any(Path(str(path) + suffix).exists() for suffix in (".grm.bin", ".grm.gz", ".rel", ".rel.bin"))
