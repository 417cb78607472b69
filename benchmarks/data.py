"""Synthetic single-cell data for the benchmarks: sparse, related donors, about 12 design columns.

Expression is generated in cell chunks from a fixed seed, so the same arguments always give the same data,
in memory (:func:`make_adata`) or streamed to a backed h5ad (:func:`write_h5ad_streamed`) without ever
holding the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from scverse_nullfit.datasets._simulate import _family_genotypes, standardised_grm

#: obs columns used as covariates (cell_type has 5 levels): with the intercept, 12 design columns.
COVARIATES = ["age", "sex", "PC1", "PC2", "PC3", "cell_type", "log_counts", "pct_mito"]
DONOR_COVARIATES = ["age", "sex", "PC1", "PC2", "PC3"]
CELL_TYPES = np.array(["B", "CD4T", "CD8T", "NK", "Mono"])


@dataclass
class Spec:
    """What to generate."""

    n_cells: int
    n_donors: int
    n_genes: int
    density: float = 0.08
    seed: int = 0


class Generator:
    """Deterministic generator of one data set's parts."""

    def __init__(self, spec: Spec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        n, G = spec.n_donors, spec.n_genes
        dosage = _family_genotypes(rng, n, 2 * n + 500)  # enough variants for a full-rank GRM
        self.grm = standardised_grm(dosage)
        self.donor_ids = np.array([f"D{i:05d}" for i in range(n)])
        # cells per donor: negative binomial around the mean, at least one, summing to n_cells exactly
        mean = spec.n_cells / n
        raw = 1 + rng.negative_binomial(n=max(mean, 1.0), p=0.5, size=n).astype(np.float64)
        counts = np.maximum(1, np.floor(raw / raw.sum() * spec.n_cells)).astype(np.int64)
        diff = spec.n_cells - counts.sum()
        order = np.argsort(-counts)
        k = 0
        while diff != 0:
            i = order[k % n]
            if diff > 0 or counts[i] > 1:
                counts[i] += np.sign(diff)
                diff -= np.sign(diff)
            k += 1
        self.codes = rng.permutation(np.repeat(np.arange(n), counts))
        self.age = rng.uniform(20, 80, n)
        self.sex = rng.choice(["F", "M"], n)
        self.pcs = rng.standard_normal((n, 3))
        # genes: detection rate, level, donor (GRM-correlated) and cell noise
        self.p_detect = np.clip(rng.beta(1.0, 1.0 / spec.density - 1.0, G), 1e-3, 0.9).astype(np.float32)
        self.level = rng.uniform(0.5, 2.5, G).astype(np.float32)
        h2 = np.where(rng.random(G) < 0.3, 0.0, rng.uniform(0.05, 0.6, G))
        self.sd_e = rng.uniform(0.3, 0.8, G).astype(np.float32)
        sd_g = np.sqrt(h2 / (1 - h2)) * self.sd_e
        w, V = np.linalg.eigh(self.grm)
        L = V * np.sqrt(np.clip(w, 0, None))
        self.u = ((L @ rng.standard_normal((n, G))) * sd_g).astype(np.float32)

    def obs(self) -> pd.DataFrame:
        rng = np.random.default_rng(self.spec.seed + 1)
        N, codes = self.spec.n_cells, self.codes
        obs = pd.DataFrame(
            {
                "donor_id": pd.Categorical(self.donor_ids[codes], categories=self.donor_ids),
                "age": self.age[codes],
                "sex": pd.Categorical(self.sex[codes], categories=["F", "M"]),
                **{f"PC{k + 1}": self.pcs[codes, k] for k in range(3)},
                "cell_type": pd.Categorical(
                    rng.choice(CELL_TYPES, N, p=[0.15, 0.35, 0.2, 0.15, 0.15]), categories=CELL_TYPES
                ),
                "log_counts": rng.normal(8.0, 0.4, N),
                "pct_mito": rng.uniform(0.0, 10.0, N),
            },
            index=pd.Index([f"c{i:07d}" for i in range(N)]),
        )
        return obs

    def var(self) -> pd.DataFrame:
        return pd.DataFrame(index=pd.Index([f"g{j:05d}" for j in range(self.spec.n_genes)]))

    def grm_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.grm, index=self.donor_ids, columns=self.donor_ids)

    def chunk(self, start: int, stop: int) -> sparse.csr_matrix:
        """Expression of cells ``start:stop`` as float32 CSR; the same cells always get the same values."""
        G = self.spec.n_genes
        step = max(1, (1 << 22) // G)  # cells are generated in blocks on a fixed grid, then sliced
        parts = []
        for k in range(start // step, (stop - 1) // step + 1):
            a, b = k * step, min(self.spec.n_cells, (k + 1) * step)
            rng = np.random.default_rng([self.spec.seed, 7, k])
            mask = rng.random((b - a, G), dtype=np.float32) < self.p_detect
            rows, cols = np.nonzero(mask)
            vals = self.level[cols] + self.u[self.codes[a:b][rows], cols]
            vals += rng.standard_normal(len(rows), dtype=np.float32) * self.sd_e[cols]
            np.maximum(vals, 0.01, out=vals)
            indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
            block = sparse.csr_matrix((vals, cols.astype(np.int32), indptr), shape=(b - a, G))
            parts.append(block[max(start, a) - a : min(stop, b) - a])
        return sparse.vstack(parts, format="csr") if len(parts) > 1 else parts[0]


def make_adata(spec: Spec):
    """The whole data set in memory (CSR float32 X)."""
    from anndata import AnnData

    gen = Generator(spec)
    step = max(1, (1 << 24) // spec.n_genes)
    X = sparse.vstack([gen.chunk(a, min(spec.n_cells, a + step)) for a in range(0, spec.n_cells, step)], format="csr")
    adata = AnnData(X=X, obs=gen.obs(), var=gen.var())
    adata.uns["grm"] = gen.grm_frame()
    return adata


def write_h5ad_streamed(spec: Spec, path: str | Path, *, chunk_cells: int = 20_000) -> Path:
    """Write the data set to ``path`` chunk by chunk (X as CSR float32); memory O(chunk), not O(cells)."""
    import anndata as ad
    import h5py

    path = Path(path)
    gen = Generator(spec)
    shell = ad.AnnData(obs=gen.obs(), var=gen.var())
    shell.uns["grm"] = gen.grm_frame()
    shell.write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        first = gen.chunk(0, min(spec.n_cells, chunk_cells))
        ad.io.write_elem(f, "X", first, dataset_kwargs={"chunks": (1 << 18,)})
        X = ad.io.sparse_dataset(f["X"])
        for a in range(chunk_cells, spec.n_cells, chunk_cells):
            X.append(gen.chunk(a, min(spec.n_cells, a + chunk_cells)))
    return path
