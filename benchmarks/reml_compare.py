"""Compare the REML of two versions of the package gene by gene on the seed-scale data.

Step 1, with the reference version importable (e.g. ``PYTHONPATH=/path/to/old/src``), saves the REML's inputs (the
problem's shared parts, the rotated residual sums and W of every gene) and that version's fits::

    PYTHONPATH=/old/src python benchmarks/reml_compare.py dump /tmp/reml_ref.pkl

Step 2, with the version to check, refits the same inputs and prints the largest differences::

    PYTHONPATH=src python benchmarks/reml_compare.py compare /tmp/reml_ref.pkl

The data set is the seed-size benchmark file (``run.py --size seed`` generates it).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIELDS = ("tau", "loglik", "sigma2_e", "tau_se", "beta", "Ainv", "resid", "converged", "n_iter")


def dump(out: str, data: str) -> None:
    import anndata as ad
    from data import COVARIATES, DONOR_COVARIATES

    import scverse_nullfit as snf
    from scverse_nullfit.tl import _fit_null

    fit_all = _fit_null.fit_all_genes

    def grab(problem, rotate, W, **kwargs):
        fits = fit_all(problem, rotate, W, **kwargs)
        inputs = {
            "lam": problem.lam, "Xrot": problem.Xrot, "Aw": problem.Aw, "n_cells": problem.N,
            "XtX": problem.functions.XtX,
            "Rt": rotate(slice(None)), "W": W, "fits": {name: getattr(fits, name) for name in FIELDS},
        }  # fmt: skip
        with open(out, "wb") as f:
            pickle.dump(inputs, f, protocol=5)
        return fits

    _fit_null.fit_all_genes = grab
    adata = ad.read_h5ad(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)


def compare(ref_path: str, n_threads: int) -> None:
    from threadpoolctl import threadpool_limits

    from scverse_nullfit._core import _reml
    from scverse_nullfit._core._design import Spectral

    with open(ref_path, "rb") as f:
        d = pickle.load(f)
    Rt, W, ref = d["Rt"], d["W"], d["fits"]
    XtX = d["XtX"] if "XtX" in d else d["Aw"] + d["Xrot"].T @ d["Xrot"]
    spectral = Spectral(lam=d["lam"], U=None, ZtX=None, Xrot=d["Xrot"], XtX=XtX, Aw=d["Aw"], n_cells=d["n_cells"])
    problem = _reml.RemlProblem(spectral)
    t0, c0 = time.perf_counter(), time.process_time()
    with threadpool_limits(1, "blas"):
        fits = _reml.fit_genes(problem, lambda sl, out: np.copyto(out, Rt[sl]) or out, W, n_threads=n_threads)
    print(f"{len(W)} genes: search {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU")
    zero = ref["tau"] == 0
    print(f"tau = 0: reference {zero.sum()}, new {(fits.tau == 0).sum()}, both {(zero & (fits.tau == 0)).sum()}")
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(fits.tau - ref["tau"])[~zero] / ref["tau"][~zero]
        print(f"tau (> 0), relative: max {rel.max():.2e}, median {np.median(rel):.2e}")
        print(f"loglik, absolute: max {np.nanmax(np.abs(fits.loglik - ref['loglik'])):.2e}")
        for name in ("sigma2_e", "tau_se"):
            a, b = getattr(fits, name), ref[name]
            print(f"{name}, relative: max {np.nanmax(np.abs(a - b) / np.abs(b)):.2e}")
        for name in ("beta", "Ainv", "resid"):
            a, b = getattr(fits, name).reshape(len(W), -1), ref[name].reshape(len(W), -1)
            e = np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)
            q = np.nanquantile(e, 0.999)
            print(f"{name}, relative to the gene's largest: max {np.nanmax(e):.2e}, 99.9% {q:.2e}")
    same = np.array_equal(fits.converged, ref["converged"])
    print(f"converged identical: {same}; evaluations per gene: new {fits.n_iter.mean():.2f}, "
          f"reference {ref['n_iter'].mean():.2f}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["dump", "compare"])
    parser.add_argument("path", help="the pickle of the reference's inputs and fits")
    parser.add_argument("--data", default="/tmp/scverse_nullfit_bench/bench_26593x1611x20000.h5ad")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.step == "dump":
        dump(args.path, args.data)
    else:
        compare(args.path, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
