"""Benchmark the count families of ``fit_null`` against the Gaussian fit of the same data, and glmer per gene.

Usage::

    python benchmarks/counts.py --cells 100000 --donors 1000 --genes 5000      # the issue's size (identity GRM)
    python benchmarks/counts.py --cells 20000 --donors 500 --genes 200 --grm dense
    python benchmarks/counts.py --calibration                                    # lambda_GC of NB score tests

Each fit runs in a fresh process (``fit`` sub-command) that reports its wall time and peak resident memory; the
three families (gaussian REML on the raw counts, poisson, negative_binomial) see the same AnnData. ``--rounds``
(default 3) repeats one fit per family in turn: each count family's ratio to the Gaussian fit is taken within a
round (the host's load changes between rounds), and the row reports the median ratio and every round's. ``--glmer``
times ``lme4::glmer`` (Poisson) and ``glmmTMB`` (nbinom2) on one gene of the same data, if ``Rscript`` is
available. Rows are appended to ``benchmarks/counts_results.json``.

The data: sparse NB counts (float32 CSR), cells spread over donors, donor-level covariates (age, sex, 3 PCs),
a 5-level cell type, and log library size as the offset; 30% of genes without a donor effect.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "counts_results.json"
COVARIATES = ["age", "sex", "PC1", "PC2", "PC3", "cell_type"]
DONOR_COVARIATES = ["age", "sex", "PC1", "PC2", "PC3"]


def make_adata(cells: int, donors: int, genes: int, grm: str = "identity", seed: int = 0, null: bool = False):
    """Simulated counts (see the module docstring); ``null=True``: no genotype effects (calibration data)."""
    import anndata as ad

    from scverse_nullfit.datasets._simulate import _family_genotypes, standardised_grm

    rng = np.random.default_rng(seed)
    ids = np.array([f"D{i:05d}" for i in range(donors)])
    n_common = 2 * donors + 500
    if null:  # also 2,000 variants with founder allele frequency 0.005-0.05, in the same families
        freq = np.concatenate([rng.uniform(0.05, 0.5, n_common), rng.uniform(0.005, 0.05, 2000)])
        dosage = _family_genotypes(rng, donors, len(freq), freq)
    else:
        dosage = _family_genotypes(rng, donors, n_common)
    G = standardised_grm(dosage[:, :n_common]) if grm == "dense" else np.eye(donors)
    codes = np.sort(rng.integers(0, donors, cells))
    age, sex, pcs = rng.uniform(20, 80, donors), rng.choice(["F", "M"], donors), rng.standard_normal((donors, 3))
    ctype = rng.choice(["B", "CD4T", "CD8T", "NK", "Mono"], cells)
    log_lib = rng.normal(np.log(3000), 0.4, cells)
    obs = pd.DataFrame(
        {
            "donor_id": pd.Categorical(ids[codes], categories=ids),
            "age": age[codes],
            "sex": pd.Categorical(sex[codes]),
            "PC1": pcs[codes, 0],
            "PC2": pcs[codes, 1],
            "PC3": pcs[codes, 2],
            "cell_type": pd.Categorical(ctype),
            "log_lib": log_lib,
        },
        index=[f"c{i}" for i in range(cells)],
    )
    w, V = np.linalg.eigh(G)
    L = V * np.sqrt(np.clip(w, 0, None))
    b0 = rng.uniform(np.log(0.005), np.log(0.5), genes) - np.log(3000)  # mean 0.005..0.5 per cell at mean depth
    s2 = np.where(rng.random(genes) < 0.3, 0.0, rng.uniform(0.02, 0.3, genes))
    theta = rng.uniform(1.0, 10.0, genes)
    ct_eff = rng.normal(0, 0.3, (5, genes))
    ct_code = pd.Categorical(ctype).codes
    blocks = []
    step = max(1, 20_000_000 // max(genes, 1))
    u = (L @ rng.standard_normal((donors, genes))) * np.sqrt(s2)
    for a in range(0, cells, step):
        b = min(cells, a + step)
        eta = log_lib[a:b, None] + b0[None] + ct_eff[ct_code[a:b]] + u[codes[a:b]]
        mu = np.exp(eta)
        y = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
        blocks.append(sparse.csr_matrix(y))
    X = sparse.vstack(blocks).tocsr()
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
    adata.layers["counts"] = X
    adata.uns["grm"] = pd.DataFrame(G, index=ids, columns=ids)
    if null:  # 400 random variants and up to 400 with minor allele frequency 0.01-0.05 (the tail calibration)
        maf = dosage.mean(axis=0) / 2
        maf = np.minimum(maf, 1 - maf)
        rare = np.flatnonzero((maf >= 0.01) & (maf <= 0.05))
        rare = rng.choice(rare, min(400, len(rare)), replace=False)
        common = rng.choice(n_common, 400, replace=False)
        adata.uns["genotypes"] = pd.DataFrame(dosage[:, np.concatenate([common, rare])], index=ids).rename(
            columns=lambda k: f"v{k}"
        )
    return adata


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child_fit(path: str, family: str) -> dict:
    import anndata as ad

    import scverse_nullfit as snf

    adata = ad.read_h5ad(path)
    kw = {"covariates": COVARIATES, "donor_covariates": DONOR_COVARIATES}
    if family == "gaussian":
        kw["covariates"] = [*COVARIATES, "log_lib"]
    else:
        kw.update(layer="counts", offset="log_lib")
    t0 = time.perf_counter()
    snf.tl.fit_null(adata, family=family, **kw)
    wall = time.perf_counter() - t0
    df = snf.get.nullfit_df(adata)
    return {"family": family, "wall": wall, "peak_gb": peak_gb(), "converged": float(df["converged"].mean())}


def run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


R_SCRIPT = """
suppressPackageStartupMessages({library(lme4); library(glmmTMB)})
d <- read.csv(commandArgs(TRUE)[1]); d$donor <- factor(d$donor)
t0 <- Sys.time(); glmer(y ~ age + sex + PC1 + PC2 + PC3 + cell_type + offset(log_lib) + (1 | donor), data = d,
                        family = poisson, nAGQ = 1)
t1 <- Sys.time(); glmmTMB(y ~ age + sex + PC1 + PC2 + PC3 + cell_type + offset(log_lib) + (1 | donor), data = d,
                          family = nbinom2)
t2 <- Sys.time()
cat(sprintf('{"glmer": %f, "glmmTMB": %f}\\n',
            as.numeric(t1 - t0, units = "secs"), as.numeric(t2 - t1, units = "secs")))
"""


def time_r(adata) -> dict | None:
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        col = np.asarray(adata.layers["counts"][:, 0].todense()).ravel()
        d = adata.obs.assign(donor=adata.obs["donor_id"].astype(str), y=col)
        d.drop(columns="donor_id").to_csv(Path(tmp) / "g.csv", index=False)
        (Path(tmp) / "t.R").write_text(R_SCRIPT)
        out = subprocess.run(
            ["Rscript", str(Path(tmp) / "t.R"), str(Path(tmp) / "g.csv")], capture_output=True, text=True
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        return json.loads(lines[-1]) if lines else None


def calibration(n_donors: int = 300, cells_per_donor: int = 15, genes: int = 300, seed: int = 1) -> dict:
    """lambda_GC of NB and Poisson score tests on null data (related donors, overdispersed counts), and the tail at
    minor allele frequency 0.01-0.05: the fraction of p-values below 1e-3 and 1e-2, normal and saddlepoint."""
    from scipy import stats

    import scverse_nullfit as snf

    adata = make_adata(n_donors * cells_per_donor, n_donors, genes, grm="dense", seed=seed, null=True)
    # related donors as family blocks: the GRM sparsified at 0.1 (exact block algebra, fast)
    adata.uns["grm"] = snf.tl.sparsify_grm(adata.uns["grm"], 0.1)
    geno = adata.uns["genotypes"]
    maf = geno.mean(axis=0) / 2
    maf = np.minimum(maf, 1 - maf)
    out = {"cells": adata.n_obs, "donors": n_donors, "genes": genes, "variants": geno.shape[1]}
    med = stats.chi2.ppf(0.5, 1)
    for family in ("negative_binomial", "poisson"):
        snf.tl.fit_null(
            adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, layer="counts", offset="log_lib",
            family=family, key_added=family,
        )  # fmt: skip
        t0 = time.perf_counter()
        res = snf.tl.score_test(adata, geno, key=family, spa=True)
        wall = time.perf_counter() - t0
        z = res["z"].to_numpy()
        ok = np.isfinite(z)
        vmaf = res["variant"].map(maf).to_numpy()
        rare = ok & (vmaf < 0.05)
        tail = ok & (vmaf >= 0.01) & (vmaf <= 0.05)
        p_spa = res["pval"].to_numpy()
        p_norm = 2 * stats.norm.sf(np.abs(z))
        row = {
            "lambda_gc": float(np.median(z[ok] ** 2) / med),
            "lambda_gc_maf_below_0.05": float(np.median(z[rare] ** 2) / med) if rare.any() else None,
            "n_tests": int(ok.sum()),
            "frac_p_below_0.001": float((p_norm[ok] < 1e-3).mean()),
            "frac_p_below_0.001_spa": float((p_spa[ok] < 1e-3).mean()),
            "maf_0.01_0.05": {"n_tests": int(tail.sum())},
            "score_test_wall_spa": wall,
        }
        for level in (1e-2, 1e-3):
            row["maf_0.01_0.05"][f"frac_p_below_{level:g}_normal"] = float((p_norm[tail] < level).mean())
            row["maf_0.01_0.05"][f"frac_p_below_{level:g}_spa"] = float((p_spa[tail] < level).mean())
        out[family] = row
        print(family, json.dumps(row), flush=True)
    return out


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "fit":
        print(json.dumps(child_fit(sys.argv[2], sys.argv[3])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--donors", type=int, default=1_000)
    p.add_argument("--genes", type=int, default=5_000)
    p.add_argument("--grm", choices=["identity", "dense"], default="identity")
    p.add_argument("--families", default="gaussian,poisson,negative_binomial")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one fit per family (medians reported)")
    p.add_argument("--glmer", action="store_true", help="also time glmer / glmmTMB on one gene")
    p.add_argument("--calibration", action="store_true", help="only the null calibration (lambda_GC)")
    args = p.parse_args(argv)
    if args.calibration:
        row = {"kind": "calibration", **calibration()}
    else:
        adata = make_adata(args.cells, args.donors, args.genes, grm=args.grm)
        with tempfile.TemporaryDirectory(dir=os.environ.get("SNF_BENCH_DATA")) as tmp:
            path = str(Path(tmp) / "counts.h5ad")
            adata.write_h5ad(path)
            row = {
                "kind": "fit", "cells": args.cells, "donors": args.donors, "genes": args.genes, "grm": args.grm,
                "nnz": int(adata.X.nnz),
            }  # fmt: skip
            families = args.families.split(",")
            runs = {family: [] for family in families}
            for r in range(args.rounds):  # rounds of one fit per family: each ratio within one round
                for family in families:
                    res = run_child(["fit", path, family])
                    runs[family].append(res)
                    print(f"round {r + 1}", family, res, flush=True)
            for family, res in runs.items():
                walls = [x["wall"] for x in res]
                row[family] = {**res[0], "wall": float(np.median(walls)), "walls": walls,
                               "peak_gb": max(x["peak_gb"] for x in res)}  # fmt: skip
        if "gaussian" in row:
            for family in ("poisson", "negative_binomial"):
                if family in row:
                    ratios = [w / g for w, g in zip(row[family]["walls"], row["gaussian"]["walls"], strict=True)]
                    row[family]["x_gaussian"] = float(np.median(ratios))
                    row[family]["x_gaussian_rounds"] = ratios
        if args.glmer:
            r = time_r(adata)
            if r is not None:
                row["R_per_gene"] = r
                for family, tool in (("poisson", "glmer"), ("negative_binomial", "glmmTMB")):
                    if family in row:
                        row[family]["speedup_vs_R_per_gene"] = r[tool] / (row[family]["wall"] / args.genes)
    row["date"] = time.strftime("%Y-%m-%d %H:%M")
    print(json.dumps(row, indent=1))
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*rows, row], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
