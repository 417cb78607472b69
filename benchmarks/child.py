"""One measurement in a fresh process (run by ``run.py``); prints one JSON line.

python benchmarks/child.py fit|read|statsmodels|first_call PATH memory|backed|dask '{"log": false}'
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import COVARIATES, DONOR_COVARIATES


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def open_adata(path: str, mode: str):
    import anndata as ad

    if mode == "memory":
        return ad.read_h5ad(path)
    if mode == "backed":
        return ad.read_h5ad(path, backed="r")
    if mode == "dask":
        import h5py

        f = h5py.File(path, "r")
        adata = ad.AnnData(
            X=ad.experimental.read_elem_lazy(f["X"]),
            obs=ad.io.read_elem(f["obs"]),
            var=ad.io.read_elem(f["var"]),
            uns=ad.io.read_elem(f["uns"]),
        )
        return adata
    raise ValueError(mode)


def nnz_of(X) -> int:
    if hasattr(X, "nnz"):
        return int(X.nnz)
    if hasattr(X, "group"):
        return int(X.group["indptr"][-1])
    return -1


#: Stored values per chunk when reading a backed matrix (the package's default chunk size too).
CHUNK_NNZ = 1 << 23


def csr_chunks(X):
    """``(start, stop, indptr, indices, data)`` row chunks of a CSR matrix, in memory or backed (h5py)."""
    if hasattr(X, "group"):  # backed: read straight from the HDF5 datasets
        group = X.group
        indptr = group["indptr"][:].astype(np.int64)
        data, indices = group["data"], group["indices"]
    else:
        indptr, indices, data = X.indptr.astype(np.int64), X.indices, X.data
    n = len(indptr) - 1
    a = 0
    while a < n:
        b = min(n, max(a + 1, int(np.searchsorted(indptr, indptr[a] + CHUNK_NNZ, side="right")) - 1))
        lo, hi = int(indptr[a]), int(indptr[b])
        yield a, b, indptr[a : b + 1] - lo, np.asarray(indices[lo:hi]), np.asarray(data[lo:hi])
        a = b


def evict(path: str) -> None:
    """Drop the file's pages from the operating system's cache, so that the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def task_read(path: str, mode: str, extra: dict) -> dict:
    """Read every stored value of X, chunk by chunk, and nothing else: from disk (cache evicted), then again."""
    evict(path)
    adata = open_adata(path, "backed")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        total = 0
        for *_, data in csr_chunks(adata.X):
            total += len(data)
        times.append(time.perf_counter() - t0)
    return {"read_cold": times[0], "read_warm": times[1], "nnz": total}


def _timed(module, name: str, stages: dict, stage: str):
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t0

    setattr(module, name, wrapper)


def task_fit(path: str, mode: str, extra: dict) -> dict:
    import scanpy as sc

    import scverse_nullfit as snf
    from scverse_nullfit.tl import _fit_null as fn_module

    if extra.get("log"):
        sc.settings.verbosity = "debug"
    if extra.get("cold"):
        evict(path)
    adata = open_adata(path, mode)
    Y = adata.X
    nnz = nnz_of(Y)
    stages: dict[str, float] = {}
    for name, stage in [
        ("spectral_precompute", "stage 1"),  # alongside the pass (the two overlap)
        ("RemlProblem", "stage 1"),
        ("sufficient_stats", "sufficient statistics"),
        ("compute_sufficient_stats", "sufficient statistics"),
        ("pre_residualise", "sufficient statistics"),
        ("fit_genes", "REML"),
        ("fit_all_genes", "REML"),
        ("results_frame", "store"),
        ("per_gene_arrays", "store"),
        ("shared_part", "store"),
        ("store", "store"),
    ]:
        if hasattr(fn_module, name):
            _timed(fn_module, name, stages, stage)
    client = None
    workers_peak = None
    if extra.get("workers"):
        from distributed import Client, LocalCluster

        client = Client(LocalCluster(n_workers=int(extra["workers"]), threads_per_worker=1, processes=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        snf.tl.fit_null(adata, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
        wall = time.perf_counter() - t0
    peak = peak_gb()
    stages["setup"] = max(0.0, wall - sum(stages.values()))  # stages may overlap (stage 1 alongside the pass)
    if client is not None:
        cluster = client.cluster
        client.close()
        cluster.close()
        # the workers were child processes: their peak memory (the largest of them)
        workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        time.sleep(2.0)  # let the workers' processes finish exiting before the floor is timed
    res = adata.varm["nullfit"]
    floor, parts = measure_floor(adata, Y if mode == "memory" else open_adata(path, "backed").X)
    return {
        "wall": wall,
        "peak_gb": peak,
        "floor": floor,
        "floor_parts": parts,
        "stages": stages,
        "nnz": nnz,
        "converged": float(res["converged"].mean()),
        "mean_h2": float(res["h2"].mean()),
        "median_iter": float(res["n_iter"].median()),
        "workers_peak_gb": workers_peak,
    }


def _zty_kernel():
    import numba

    @numba.njit(nogil=True, cache=True)
    def zty(indptr, indices, data, order, codes, S):  # pragma: no cover - compiled
        for ii in range(order.shape[0]):
            i = order[ii]
            d = codes[i]
            for k in range(indptr[i], indptr[i + 1]):
                S[d, indices[k]] += data[k]

    return zty


def measure_floor(adata, Y) -> tuple[float, dict]:
    """eigh of D^1/2 G D^1/2 + one sparse pass for Z'Y + one rotation GEMM, timed now in this process.

    The sparse pass is a compiled scatter-add over CSR rows visited donor by donor (each chunk of a backed
    matrix read then summed); the package's own code is not used, so any version can be compared.
    """
    zty = _zty_kernel()
    zty(np.zeros(2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64),
        np.zeros(0, np.int64), np.zeros((1, 1)))  # fmt: skip  # compile (or load) before timing
    ids = np.asarray(adata.uns["nullfit"]["donors"])
    codes = adata.obs["donor_id"].astype(str).map({d: i for i, d in enumerate(ids)}).to_numpy().astype(np.int64)
    counts = np.bincount(codes, minlength=len(ids)).astype(np.float64)
    G = adata.uns["grm"].loc[ids, ids].to_numpy()
    parts = {}
    from threadpoolctl import threadpool_limits

    M = G * np.sqrt(counts)[:, None] * np.sqrt(counts)[None, :]
    eigh_times = []
    for limit in (None, 1):  # the faster of all BLAS threads and one (on a busy machine, threads wait for cores)
        with threadpool_limits(limits=limit, user_api="blas"):
            t0 = time.perf_counter()
            _, U = np.linalg.eigh(M)
            eigh_times.append(time.perf_counter() - t0)
    parts["eigh"] = min(eigh_times)
    t0 = time.perf_counter()
    S = np.zeros((len(ids), Y.shape[1]))
    for a, b, indptr, indices, data in csr_chunks(Y):
        c = codes[a:b]
        zty(indptr, indices, data, np.argsort(c, kind="stable"), c, S)
    parts["pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    S /= np.sqrt(counts)[:, None]
    _ = U.T @ S
    parts["gemm"] = time.perf_counter() - t0
    return sum(parts.values()), parts


def task_first_call(path: str, mode: str, extra: dict) -> dict:
    """The first and the second fit in this fresh process (the first compiles or loads the kernels).

    Run by ``run.py`` with an empty numba cache (``NUMBA_CACHE_DIR`` unset, the user cache dir a new empty
    directory) and the package imported from a read-only copy, so the first fit compiles whatever it needs. The import
    of ``scverse_nullfit.tl`` (which imports scanpy) is timed on its own (``import``), before the data are read.
    """
    t0 = time.perf_counter()
    import scverse_nullfit as snf
    import scverse_nullfit.tl  # the subpackages are imported on first use: time it here, not in the fit

    t_import = time.perf_counter() - t0
    adata = open_adata(path, mode)
    second = adata.copy()
    walls, cpus = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in (adata, second):
            t0, c0 = time.perf_counter(), time.process_time()
            snf.tl.fit_null(a, covariates=COVARIATES, donor_covariates=DONOR_COVARIATES)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)  # all threads: a busy machine stretches the wall time, not this
    package = Path(snf.__file__).parent
    written = sorted(str(p) for p in package.rglob("*.nbi"))
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    user = sorted(str(p.relative_to(cache_home)) for p in cache_home.rglob("*.nbi")) if cache_home.exists() else []
    return {
        "import": t_import,
        "first": walls[0],
        "second": walls[1],
        "first_cpu": cpus[0],
        "second_cpu": cpus[1],
        "package": str(package),
        "package_writable": os.access(package, os.W_OK) and not _read_only_mount(package),
        "cache_in_package": len(written),
        "cache_in_user_dir": len(user),
    }


def task_airqtl_inputs(path: str, mode: str, extra: dict) -> dict:
    """Write airqtl's inputs for the first ``extra["genes"]`` genes: dense expression (genes x cells) and covariates
    (covariates x cells, intercept first) with cells sorted by donor, cells per donor and the donors' kinship."""
    adata = open_adata(path, mode)
    obs = adata.obs
    donors = obs["donor_id"].astype(str).to_numpy()
    grm = adata.uns["grm"]
    ids = np.asarray(grm.index.astype(str))
    ids = ids[np.isin(ids, donors)]
    code = {d: i for i, d in enumerate(ids)}
    codes = np.array([code[d] for d in donors])
    order = np.argsort(codes, kind="stable")
    k = int(extra.get("genes", 400))
    Y = adata.X[:, :k]
    Y = Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)
    dt = np.ascontiguousarray(Y[order].T, dtype=np.float64)
    dc = np.ascontiguousarray(_design(obs)[order].T)
    ns = np.bincount(codes, minlength=len(ids)).astype(np.int64)  # uint64 would make its offsets float
    mk = grm.loc[ids, ids].to_numpy(np.float64)
    out = extra["out"]
    np.savez(out, dt=dt, dc=dc, ns=ns, mk=mk)
    return {"out": out, "genes": k}


def _design(obs) -> np.ndarray:
    """Intercept and the covariates (categoricals one-hot without their first level), cells x columns."""
    import pandas as pd

    blocks = [np.ones((len(obs), 1))]
    for col in COVARIATES:
        s = obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            for lev in list(s.cat.categories)[1:]:
                blocks.append((s == lev).to_numpy(np.float64)[:, None])
        else:
            blocks.append(s.to_numpy(np.float64)[:, None])
    return np.hstack(blocks)


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def task_statsmodels(path: str, mode: str, extra: dict) -> dict:
    import statsmodels.api as sm

    adata = open_adata(path, mode)
    obs = adata.obs
    X = _design(obs)
    groups = obs["donor_id"].astype(str).to_numpy()
    genes = [0, 1]
    Yg = adata.X[:, genes]
    Yg = Yg.toarray() if hasattr(Yg, "toarray") else np.asarray(Yg)
    times = []
    for j in range(len(genes)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            sm.MixedLM(Yg[:, j].astype(np.float64), X, groups=groups).fit(reml=True)
            times.append(time.perf_counter() - t0)
    return {"per_gene": float(np.mean(times))}


if __name__ == "__main__":
    task, path, mode = sys.argv[1:4]
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    _ = DONOR_COVARIATES
    tasks = {"read": task_read, "fit": task_fit, "statsmodels": task_statsmodels, "first_call": task_first_call,
             "airqtl_inputs": task_airqtl_inputs}  # fmt: skip
    result = tasks[task](path, mode, extra)
    print(json.dumps(result))
