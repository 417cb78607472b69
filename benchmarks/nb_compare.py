"""Compare the count fits (Poisson / NB) of two versions of the package gene by gene, and time them.

Step 1, with each version importable, fits the same data and saves the per-gene results::

    PYTHONPATH=/old/src python benchmarks/nb_compare.py run /tmp/ref_nb.npz --family negative_binomial
    PYTHONPATH=src python benchmarks/nb_compare.py run /tmp/new_nb.npz --family negative_binomial

Step 2 prints the largest differences::

    python benchmarks/nb_compare.py compare /tmp/ref_nb.npz /tmp/new_nb.npz

The data: ``counts.make_adata`` (identity GRM) at ``--cells x --donors x --genes``, cached under ``--cache``.
With ``SNF_COUNT_EVALS=1`` (and a separate NUMBA_CACHE_DIR) ``n_iter`` holds the evaluation counters.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIELDS = ("beta", "beta_se", "sigma2_g", "sigma2_g_se", "theta", "loglik", "loglik0", "converged", "boundary", "n_iter")


def data_path(cells: int, donors: int, genes: int, cache: str) -> str:
    path = Path(cache) / f"counts_{cells}x{donors}x{genes}.h5ad"
    if not path.exists():
        from counts import make_adata

        path.parent.mkdir(parents=True, exist_ok=True)
        make_adata(cells, donors, genes).write_h5ad(path)
    return str(path)


def run(out: str, family: str, path: str, n_threads: int) -> None:
    import anndata as ad
    from counts import COVARIATES, DONOR_COVARIATES

    import scverse_nullfit as snf
    from scverse_nullfit._core import _glmm

    grabbed = {}
    concat = _glmm.concat_fits

    def grab(parts, *args):
        fits = concat(parts, *args)
        grabbed["fits"] = fits
        return fits

    _glmm.concat_fits = grab
    adata = ad.read_h5ad(path)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snf.tl.fit_null(
            adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES, layer="counts", offset="log_lib",
            family=family, n_threads=n_threads,
        )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    fits = grabbed["fits"]
    print(f"{snf.__file__}\n{family}: {adata.n_vars} genes, {wall:.2f} s wall, {cpu:.2f} s CPU, "
          f"converged {fits.converged.mean():.4f}, boundary {fits.boundary.sum()}")  # fmt: skip
    np.savez(out, wall=wall, cpu=cpu, **{f: getattr(fits, f) for f in FIELDS})


def compare(ref_path: str, new_path: str) -> None:
    ref, new = np.load(ref_path), np.load(new_path)
    print(f"wall {float(ref['wall']):.2f} -> {float(new['wall']):.2f} s, CPU {float(ref['cpu']):.2f} -> "
          f"{float(new['cpu']):.2f} s")  # fmt: skip
    for name in ("converged", "boundary"):
        a, b = ref[name], new[name]
        print(f"{name}: reference {a.sum()}, new {b.sum()}, differ {(a != b).sum()}")
    ok = ref["converged"] & new["converged"]
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in ("sigma2_g", "theta", "sigma2_g_se", "beta", "beta_se"):
            a, b = ref[name][ok], new[name][ok]
            scale = np.abs(a)
            if a.ndim == 2:
                scale = np.abs(a).max(axis=1, keepdims=True)
            rel = np.abs(a - b) / scale
            rel = rel[np.isfinite(rel)]
            worst = np.nanmax(rel) if rel.size else np.nan
            print(f"{name}, relative: max {worst:.2e}, 99% {np.nanquantile(rel, 0.99) if rel.size else np.nan:.2e}")
        z = np.abs(ref["sigma2_g"][ok] - new["sigma2_g"][ok]) / ref["sigma2_g_se"][ok]
        print(f"sigma2_g, difference / its standard error: max {np.nanmax(z):.2e}")
        for name in ("loglik", "loglik0"):
            d = np.abs(ref[name][ok] - new[name][ok])
            lower = (new[name][ok] < ref[name][ok] - 1e-8).sum()
            print(f"{name}, absolute: max {np.nanmax(d):.2e}; new lower by > 1e-8: {lower}")
    if ref["n_iter"].max() > 1000:
        for lab, arr in (("reference", ref["n_iter"]), ("new", new["n_iter"])):
            a = arr[ok]
            ev, fd, bd, inner = a // 10**7, (a // 10**5) % 100, (a // 1000) % 100, a % 1000
            print(f"{lab}: evaluations {ev.mean():.2f} (finite-difference {fd.mean():.2f}, boundary {bd.mean():.2f}), "
                  f"inner passes {inner.mean():.2f}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["run", "compare"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--family", default="negative_binomial")
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--donors", type=int, default=1_000)
    parser.add_argument("--genes", type=int, default=1_000)
    parser.add_argument("--cache", default="/tmp/scverse_nullfit_bench")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.step == "run":
        run(args.paths[0], args.family, data_path(args.cells, args.donors, args.genes, args.cache), args.threads)
    else:
        compare(*args.paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
