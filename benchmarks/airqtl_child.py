"""airqtl's heritability estimator on prepared inputs (run by ``run.py`` with airqtl's own Python; prints JSON).

python benchmarks/airqtl_child.py INPUTS.npz

airqtl 0.1.1 (the last release for Python 3.11) is installed in a separate virtual environment for this benchmark only
(``python -m venv /work/venv-airqtl && /work/venv-airqtl/bin/pip install airqtl==0.1.1``); it is not a dependency
of scverse-nullfit. Its estimator (``airqtl.heritability.estimate``, numpy on the CPU) fits one gene at a time by
maximum likelihood from the donor sums rotated by the kinship eigenvectors, with cells sorted by donor and the
expression dense (genes x cells).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(path: str) -> dict:
    from airqtl import heritability, kinship

    d = np.load(path)
    dt, dc, ns, mk = d["dt"], d["dc"], d["ns"], d["mk"]
    t0 = time.perf_counter()
    mkl, mku = kinship.eigen(mk, ns.astype(float))
    t_eigen = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, beta, _, ok = heritability.estimate(dt, dc, ns, mkl, mku)
    t_genes = time.perf_counter() - t0
    import airqtl

    return {
        "version": getattr(airqtl, "__version__", "0.1.1"),
        "eigen": t_eigen,
        "genes": int(dt.shape[0]),
        "fit": t_genes,
        "per_gene": t_genes / dt.shape[0],
        "success": float(np.mean(ok)),
        "h2_median": float(np.median(beta / (1 + beta))),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
