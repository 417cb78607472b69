"""Benchmark ``scverse_nullfit.tl.trans_map`` on a slice, next to the GEMM floor of the same slice, and project
the genome-wide scan (20,000 genes x 1,000,000 variants x 1,000 donors).

Usage::

    python benchmarks/trans.py                                   # 20,000 genes x 2,000 variants x 1,000 donors
    python benchmarks/trans.py --variants 10000 --json benchmarks/trans_results.json

One process: the null model is fitted on simulated cells (``benchmarks/data.py``: 10,000 cells, 12 design
columns), the dosages (binomial(2, maf), dense float64, in memory) are made once, then

- ``wall``: the whole ``trans_map`` call on the slice (threshold 1e-5);
- ``floor``: in the same process, the least any exact score test must do on the same slice, in the same variant
  chunks: the rotation ``U' D^1/2 G`` (donors x donors x variants) and one GEMM of the genes' weighted residuals
  with the rotated variants (genes x donors x variants), which gives the scores alone;
- ``stat GEMMs``: the products the exact variance adds (the stacked ``(w * X~)'`` GEMM, genes x (p + 1) x donors x
  variants, and ``W @ g~^2``), timed alone: what ``trans_map`` computes beyond the floor;
- ``working memory``: the peak of ``tracemalloc`` (numpy allocations) during ``trans_map`` on the first chunks,
  beyond what was allocated before the call (the compact null model's genes x donors arrays included).

Genes at ``tau = 0`` share ``v = X~'g~`` and cost the score GEMM only, so the time depends on how many there are
(reported as ``genes_at_tau0``).

The projection multiplies the slice's times by ``1,000,000 / variants`` (the cost is linear in the variants).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import COVARIATES, DONOR_COVARIATES, Spec, make_adata  # noqa: E402

GENOME_VARIANTS = 1_000_000


def genotypes(donors, variants: int, seed: int = 0):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    maf = rng.uniform(0.05, 0.5, variants)
    X = rng.binomial(2, maf[None, :], size=(len(donors), variants)).astype(np.float64)
    g = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(donors, dtype=str)))
    g.var_names = [f"v{j:07d}" for j in range(variants)]
    g.var["chrom"] = "1"
    g.var["pos"] = np.arange(variants, dtype=np.int64) * 1000 + 1
    return g


def floors(adata, geno, chunk: int) -> tuple[float, float]:
    """(floor, stat GEMMs) in seconds on the same slice, in the same variant chunks."""
    from scverse_nullfit._core._step2 import impute
    from scverse_nullfit.tl._step2 import StoredNull

    model = StoredNull.read(adata, "nullfit").compact(np.ones(adata.n_vars, dtype=bool))
    rows = np.arange(geno.n_obs)
    X = np.asarray(geno.X)
    sq = np.sqrt(model.counts)[:, None]
    n, p = model.Xrot.shape
    floor = extra = 0.0
    gstep = max(1, (1 << 23) // ((p + 4) * chunk))
    for v0 in range(0, X.shape[1], chunk):
        G, _ = impute(X[rows, v0 : v0 + chunk])
        t0 = time.perf_counter()
        Gt = model.U.T @ (sq * G)
        for g0 in range(0, model.n_genes, gstep):
            model.WR[g0 : g0 + gstep] @ Gt
        floor += time.perf_counter() - t0
        t0 = time.perf_counter()
        Gt2 = Gt * Gt
        for g0 in range(0, model.n_genes, gstep):
            W = model.W[g0 : g0 + gstep]
            A = (W[:, None, :] * model.Xrot.T[None, :, :]).reshape(-1, n)
            A @ Gt
            W @ Gt2
        extra += time.perf_counter() - t0
    return floor, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--variants", type=int, default=2_000)
    parser.add_argument("--donors", type=int, default=1_000)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--threshold", type=float, default=1e-5)
    parser.add_argument("--json", help="append the result to this JSON list")
    args = parser.parse_args()

    import scanpy as sc
    from threadpoolctl import threadpool_info

    import scverse_nullfit as snf

    sc.settings.verbosity = 0
    t0 = time.perf_counter()
    adata = make_adata(Spec(args.cells, args.donors, args.genes))
    snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
    adata.X = None
    print(f"fitted {args.genes} genes in {time.perf_counter() - t0:.1f} s (setup)", file=sys.stderr)
    geno = genotypes(adata.uns["nullfit"]["donors"], args.variants)
    chunk = snf.tl._trans_map.TRANS_CHUNK

    # working memory on the first chunks (tracemalloc slows allocation a little: not timed)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    snf.tl.trans_map(adata, geno[:, : min(args.variants, 2 * chunk)], pval_threshold=args.threshold, copy=True)
    work = (tracemalloc.get_traced_memory()[1] - base) / 1e9
    tracemalloc.stop()

    t0 = time.perf_counter()
    out = snf.tl.trans_map(adata, geno, pval_threshold=args.threshold, copy=True)
    wall = time.perf_counter() - t0
    floor, stat = floors(adata, geno, chunk)
    scale = GENOME_VARIANTS / args.variants
    blas = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
    row = {
        "genes": args.genes,
        "variants": args.variants,
        "donors": args.donors,
        "covariates": int(adata.uns["nullfit"]["covariates_rotated"].shape[1]),
        "genes_at_tau0": int((adata.varm["nullfit"]["tau"] == 0).sum()),
        "chunk": chunk,
        "wall_s": round(wall, 2),
        "floor_s": round(floor, 2),
        "stat_gemm_s": round(stat, 2),
        "wall_over_floor": round(wall / floor, 2),
        "wall_over_floor_plus_stat": round(wall / (floor + stat), 2),
        "working_memory_gb": round(work, 3),
        "kept": int(out.uns["trans"]["params"]["n_associations"]),
        "projected_1M_wall_h": round(wall * scale / 3600, 2),
        "projected_1M_floor_h": round(floor * scale / 3600, 2),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
        f"{blas.get('internal_api', '?')} {blas.get('version', '')} ({blas.get('num_threads', '?')} threads)",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row))
    print(
        f"| {args.genes:,} | {args.variants:,} | {args.donors:,} | {row['covariates']} | {wall:.1f} | {floor:.1f} | "
        f"{stat:.1f} | {wall / floor:.2f} | {wall / (floor + stat):.2f} | {work:.2f} | "
        f"{row['projected_1M_wall_h']:.1f} | {row['projected_1M_floor_h']:.1f} |"
    )
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
