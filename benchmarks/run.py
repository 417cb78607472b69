"""Benchmark ``scverse_nullfit.tl.fit_null``: wall time and peak memory against the same-run floor.

Usage::

    python benchmarks/run.py --size seed              # 26,593 cells x 1,611 donors x 20,000 genes, in memory
    python benchmarks/run.py --size stream            # 1,000,000 cells x 1,000 donors x 5,000 genes, backed h5ad
    python benchmarks/run.py --size scaling           # cells 10k -> 100k -> 1M, genes 1k -> 5k -> 20k
    python benchmarks/run.py --size all --markdown docs/benchmarks.md

Each data set is generated once (streamed to an h5ad in ``--data-dir``, never held whole) and reused. Every
measurement runs in a fresh Python process, which reports its own peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, so BLAS and numba allocations count) with the loaded data included.

Columns:

- ``wall``: the whole ``fit_null`` call (from an AnnData already opened in the stated mode).
- ``peak``: the process's peak resident memory, loaded data and interpreter included.
- ``floor``: in the same process after the fit, the sum of one eigendecomposition of the donors x donors
  matrix, one sparse pass computing ``Z'Y`` (a compiled scatter-add, the fastest we have), and one rotation
  GEMM ``U' D^-1/2 Z'Y``; ``ratio`` = wall / floor.
- ``read``: for backed data, the time to read the matrix from disk once (chunk by chunk, in a separate fresh
  process, before the fit); ``/read`` = wall / read.
- ``sm/gene``: statsmodels ``MixedLM(reml=True)`` per gene on two genes of the same data (identity GRM, same
  design), and ``speedup`` = its per-gene time / ours (wall / genes). Skipped above 200,000 cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (cells, donors, genes, mode)
SIZES = {
    "tiny": (3_000, 150, 500, "memory"),
    "seed": (26_593, 1_611, 20_000, "memory"),
    "stream": (1_000_000, 1_000, 5_000, "backed"),
    "cells-10k": (10_000, 1_000, 5_000, "backed"),
    "cells-100k": (100_000, 1_000, 5_000, "backed"),
    "genes-1k": (26_593, 1_611, 1_000, "memory"),
    "genes-2k": (26_593, 1_611, 2_000, "memory"),
    "genes-5k": (26_593, 1_611, 5_000, "memory"),
    "stream-dask": (1_000_000, 1_000, 5_000, "dask"),
    "stream-cluster": (1_000_000, 1_000, 5_000, "dask-cluster"),
    "first-call": (26_593, 1_611, 20_000, "memory"),
    "airqtl": (26_593, 1_611, 20_000, "memory"),
}
GROUPS = {
    "scaling": ["cells-10k", "cells-100k", "stream", "genes-1k", "genes-2k", "genes-5k", "seed"],
    "dask": ["stream-dask", "stream-cluster"],
    "all": [
        "seed",
        "first-call",
        "airqtl",
        "stream",
        "cells-10k",
        "cells-100k",
        "genes-1k",
        "genes-2k",
        "genes-5k",
        "stream-dask",
        "stream-cluster",
    ],
}
STATSMODELS_MAX_CELLS = 200_000


def data_path(data_dir: Path, cells: int, donors: int, genes: int) -> Path:
    return data_dir / f"bench_{cells}x{donors}x{genes}.h5ad"


def ensure_data(data_dir: Path, cells: int, donors: int, genes: int) -> Path:
    """Generate the data set (streamed to disk) unless it exists."""
    path = data_path(data_dir, cells, donors, genes)
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.h5ad")
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); from data import Spec, write_h5ad_streamed; "
        f"write_h5ad_streamed(Spec({cells}, {donors}, {genes}), {str(tmp)!r})"
    )
    t0 = time.perf_counter()
    print(f"generating {path.name} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    tmp.rename(path)
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def run_child(task: str, path: Path, mode: str, extra: dict | None = None) -> dict:
    """Run ``child.py`` in a fresh process and return its JSON report."""
    cmd = [sys.executable, str(HERE / "child.py"), task, str(path), mode, json.dumps(extra or {})]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if out.stderr.strip():
        print(out.stderr.rstrip(), file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_call(path: Path) -> dict:
    """The first and second fit in a fresh process, with an empty numba cache and a read-only copy of the package.

    The copy is made read-only with a read-only bind mount in a private mount namespace when running as root (for
    whom file modes do not stop writes), else with ``chmod -R a-w``; numba then caches in the user cache directory
    (``XDG_CACHE_HOME``, pointed at a new empty directory).
    """
    code = "import scverse_nullfit, os; print(os.path.dirname(scverse_nullfit.__file__))"
    where = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="snf-first-call-") as tmp:
        pkg, cache = Path(tmp, "site"), Path(tmp, "cache")
        shutil.copytree(where, pkg / "scverse_nullfit", ignore=shutil.ignore_patterns("__pycache__"))
        cache.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env["PYTHONPATH"] = os.pathsep.join([str(pkg), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        env["XDG_CACHE_HOME"] = str(cache)
        cmd = [sys.executable, str(HERE / "child.py"), "first_call", str(path), "memory", "{}"]
        if os.geteuid() == 0 and shutil.which("unshare"):
            script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
            cmd = ["unshare", "--mount", "sh", "-c", script, "sh", str(pkg), *cmd]
        else:
            subprocess.run(["chmod", "-R", "a-w", str(pkg)], check=True)
        try:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(pkg)], check=False)
    if out.stderr.strip():
        print(out.stderr.rstrip(), file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Genes airqtl fits (one at a time); its time is extrapolated to all genes.
AIRQTL_GENES = 400


def airqtl(path: Path, python: str) -> dict:
    """airqtl's heritability estimator on the first ``AIRQTL_GENES`` genes, run by airqtl's own ``python``."""
    if not Path(python).exists():
        return {"error": f"no airqtl environment at {python} (see benchmarks/airqtl_child.py)"}
    with tempfile.TemporaryDirectory(prefix="snf-airqtl-") as tmp:
        inputs = Path(tmp, "airqtl_inputs.npz")
        run_child("airqtl_inputs", path, "memory", {"genes": AIRQTL_GENES, "out": str(inputs)})
        out = subprocess.run([python, str(HERE / "airqtl_child.py"), str(inputs)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(
    name: str, data_dir: Path, *, statsmodels: bool = True, log: bool = False, airqtl_python: str = "", repeat: int = 1
) -> dict:
    cells, donors, genes, mode = SIZES[name]
    path = ensure_data(data_dir, cells, donors, genes)
    if name == "airqtl":
        res = airqtl(path, airqtl_python)
        row = {"size": "airqtl 0.1.1", "kind": "airqtl", "mode": mode, "cells": cells, "donors": donors, "genes": genes}
        row.update(res)
        if "per_gene" in res:
            row["wall"] = res["eigen"] + res["per_gene"] * genes
        return row
    if name == "first-call":
        runs = [first_call(path) for _ in range(max(1, repeat))]
        res = {**runs[0], "first": min(r["first"] for r in runs), "second": min(r["second"] for r in runs)}
        if all("first_cpu" in r for r in runs):  # CPU seconds of all threads, from the same fastest-of rule
            res["extra_cpu"] = min(r["first_cpu"] for r in runs) - min(r["second_cpu"] for r in runs)
        return {"size": "first call, empty cache", "kind": "first_call", "mode": mode, "cells": cells,
                "donors": donors, "genes": genes, **res, "extra": res["first"] - res["second"]}  # fmt: skip
    row = {"size": name, "mode": mode, "cells": cells, "donors": donors, "genes": genes}
    extra = {"log": log}
    if mode == "dask-cluster":
        extra["workers"] = 2
    child_mode = "dask" if mode.startswith("dask") else mode
    if mode == "memory":
        # the fastest of `repeat` fresh processes (a busy machine only ever slows a run down), with its own floor
        fit = min((run_child("fit", path, child_mode, extra) for _ in range(max(1, repeat))), key=lambda r: r["wall"])
        row.update(fit)
        row["repeat"] = max(1, repeat)
        row["ratio"] = fit["wall"] / fit["floor"]
    else:
        # from disk: the file's cached pages are dropped before the read and before the fit; then both warm
        read = run_child("read", path, "backed")
        cold = min((run_child("fit", path, child_mode, {**extra, "cold": True}) for _ in range(max(1, repeat))),
                   key=lambda r: r["wall"])  # fmt: skip
        warm = min((run_child("fit", path, child_mode, extra) for _ in range(max(1, repeat))), key=lambda r: r["wall"])
        row.update(warm)
        row.update(
            {
                "wall": cold["wall"],
                "peak_gb": max(cold["peak_gb"], warm["peak_gb"]),
                "read": read["read_cold"],
                "nnz": read["nnz"],
                "/read": cold["wall"] / read["read_cold"],
                "wall_warm": warm["wall"],
                "read_warm": read["read_warm"],
                "ratio": warm["wall"] / warm["floor"],
                "stages_cold": cold["stages"],
            }
        )
        if cold.get("workers_peak_gb") is not None:
            row["workers_peak_gb"] = max(cold["workers_peak_gb"], warm["workers_peak_gb"])
    if statsmodels and cells <= STATSMODELS_MAX_CELLS:
        sm = run_child("statsmodels", path, "memory" if mode == "memory" else "backed")
        row["sm/gene"] = sm["per_gene"]
        row["speedup"] = sm["per_gene"] / (row.get("wall_warm", row["wall"]) / genes)
    return row


COLUMNS = [
    ("size", "size", "{}"),
    ("mode", "input", "{}"),
    ("cells", "cells", "{:,}"),
    ("donors", "donors", "{:,}"),
    ("genes", "genes", "{:,}"),
    ("nnz", "non-zeros", "{:,}"),
    ("wall", "wall (s)", "{:.1f}"),
    ("peak_gb", "peak (GB)", "{:.2f}"),
    ("workers_peak_gb", "worker peak (GB)", "{:.2f}"),
    ("floor", "floor (s)", "{:.1f}"),
    ("ratio", "wall/floor", "{:.2f}"),
    ("read", "read from disk (s)", "{:.1f}"),
    ("/read", "wall/read", "{:.2f}"),
    ("wall_warm", "warm cache: wall (s)", "{:.1f}"),
    ("read_warm", "warm cache: read (s)", "{:.1f}"),
    ("sm/gene", "statsmodels (s/gene)", "{:.2f}"),
    ("speedup", "statsmodels/ours per gene", "{:,.0f}"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        if row.get("kind") in ("first_call", "airqtl"):
            continue
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _import_time(row: dict) -> str:
    # rows measured before the tools' import was timed on its own hold the (lazy) top-level import only
    return f"{row['import']:.2f}" if row.get("import", 0.0) > 1e-3 else "in the first fit"


def first_call_table(rows: list[dict]) -> str:
    lines = [
        "| size | data | import (s) | first fit (s) | second fit (s) | first - second (s) | first - second, CPU (s) | "
        "package read-only | cache written |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("kind") != "first_call":
            continue
        where = f"{row['cache_in_user_dir']} in the user cache dir, {row['cache_in_package']} in the package"
        lines.append(
            f"| {row['size']} | {row['cells']:,} x {row['donors']:,} x {row['genes']:,} | {_import_time(row)} | "
            f"{row['first']:.2f} | "
            f"{row['second']:.2f} | {row['extra']:.2f} | {_fmt(row.get('extra_cpu'))} | "
            f"{'no' if row['package_writable'] else 'yes'} | {where} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def airqtl_table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row.get("kind") != "airqtl":
            continue
        label = row["size"].removeprefix("airqtl")  # the seed row of the same run: the same label
        seed = next((r for r in rows if r.get("size") == f"seed{label}"), None)
        seed = seed or next((r for r in rows if r.get("size") == "seed"), None)
        if "error" in row:
            lines.append(f"airqtl could not be run: {row['error']}")
            continue
        ours = seed["wall"] if seed else float("nan")
        lines += [
            "| tool | genes fitted | kinship eigendecomposition (s) | per gene (s) | all 20,000 genes (s) | "
            "scverse-nullfit, same data (s) | airqtl / scverse-nullfit |",
            "|---|---|---|---|---|---|---|",
            f"| airqtl {row.get('version', '0.1.1')} (CPU) | {row['genes']:,} of {row.get('total_genes', 20_000):,} | "
            f"{row['eigen']:.2f} | {row['per_gene']:.4f} | {row['wall']:.0f} (extrapolated) | {ours:.1f} | "
            f"{row['wall'] / ours:.1f} |",
        ]
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> str:
    lines = [
        "| size | " + " | ".join(STAGES) + " | floor: eigh | floor: Z'Y pass | floor: GEMM |",
        "|---" * (len(STAGES) + 4) + "|",
    ]
    for row in rows:
        if row.get("kind") in ("first_call", "airqtl"):
            continue
        st = row.get("stages", {})
        fl = row.get("floor_parts", {})
        vals = [f"{st[s]:.2f}" if s in st else "-" for s in STAGES]
        vals += [f"{fl.get(k, float('nan')):.2f}" for k in ("eigh", "pass", "gemm")]
        lines.append(f"| {row['size']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


STAGES = ["setup", "stage 1", "sufficient statistics", "REML", "store"]


def machine() -> str:
    import numpy as np

    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i['version']} ({i['num_threads']} threads)" for i in threadpool_info())
    except Exception:  # informational only
        blas = "?"
    system = f"{platform.platform()}, {os.cpu_count()} CPUs"
    return f"{system}, Python {platform.python_version()}, numpy {np.__version__}, {blas}"


PAGE_HEAD = """# Benchmarks

How long `fit_null` takes and how much memory it needs, from the seed's data size (26,593 cells, 1,611 donors,
20,000 genes) to a million cells streamed from disk. Generated by `benchmarks/run.py` (re-run it to update
this page):

```bash
python benchmarks/run.py --size all --markdown docs/benchmarks.md
```

The data are simulated (`benchmarks/data.py`): related donors (a GCTA-style GRM from simulated families),
log-normalised sparse expression (about 8% non-zero, float32 CSR) with per-gene donor effects, and 12 design
columns (intercept, age, sex and 3 genotype PCs at donor level; 5 cell types, library size and mitochondrial
fraction at cell level). Every measurement runs in a fresh process.

- **wall**: the whole `fit_null` call, from an AnnData already opened in the stated input mode (`memory`:
  `read_h5ad`; `backed`: `read_h5ad(..., backed="r")`; `dask`: X from `anndata.experimental.read_elem_lazy` on the
  threaded scheduler; `dask-cluster`: the same under a `distributed.LocalCluster` of 2 worker processes). For
  on-disk inputs the file's pages are first dropped from the operating system's cache
  (`posix_fadvise(DONTNEED)`), so X really comes from disk.
- **peak**: the process's peak resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`), interpreter and loaded data
  included; **worker peak**: the largest dask worker's.
- **floor**: measured in the same process right after the fit: one eigendecomposition of the donors x donors
  matrix (the faster of all BLAS threads and one: on a busy machine, BLAS threads waiting for cores can make the
  multi-threaded one many times slower) + one sparse pass computing `Z'Y` (a compiled scatter-add, not the package's
  code) + one rotation GEMM `U' D^-1/2 Z'Y`. No exact method can do less; **wall/floor** is the ratio (for on-disk
  inputs, both with the file in the cache).
- **read from disk**: the time to read every stored value of the matrix from the h5ad once, chunk by chunk, with
  the file's cached pages dropped first; **wall/read** is the ratio. **warm cache**: the same fit and read again
  with the file in the operating system's cache (memory speed: a lower bound no disk reaches).
- **statsmodels**: `statsmodels` `MixedLM(...).fit(reml=True)` on two genes of the same data with the same design
  and an identity GRM (it cannot take a GRM), per gene; the last column is its per-gene time over ours
  (wall / genes). Skipped above 200,000 cells.

The machine is shared (2 cores, other jobs running), so absolute times vary by tens of percent between runs;
the ratios are taken within one run.
"""


def page(rows: list[dict], extra: str = "") -> str:
    out = [
        PAGE_HEAD,
        "## Results\n",
        table(rows),
        "",
        "Stage timings of the fit (s) and the parts of its floor (s):",
        "",
    ]
    out += [stage_table(rows), ""]
    first = first_call_table(rows)
    if first:
        out += [
            "The first fit in a fresh process, with an empty numba cache and the package on a read-only file system "
            "(numba compiles the kernels, partly while stage 1 and the pass run, and writes them to the user cache "
            "directory), against the second fit in the same process:",
            "",
            first,
            "",
        ]
    air = airqtl_table(rows)
    if air:
        out += [
            "airqtl's heritability estimator (`airqtl.heritability.estimate`, maximum likelihood, numpy on the CPU; "
            "airqtl 0.1.1 in its own virtual environment) on the seed's data, against the `seed` row of the same "
            "run (the whole `fit_null`):",
            "",
            air,
            "",
        ]
    out += [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.", ""]
    step2 = HERE / "step2.md"  # the cis map by genotype format, written by step2.py
    if step2.exists():
        out += [step2.read_text().rstrip(), ""]
    if extra:
        out += [extra, ""]
    return "\n".join(out)


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="seed", help=f"one of {sorted(SIZES)} or {sorted(GROUPS)} (comma-separated)")
    parser.add_argument("--data-dir", default=os.environ.get("SNF_BENCH_DATA", "/tmp/scverse_nullfit_bench"))
    parser.add_argument("--no-statsmodels", action="store_true", help="skip the statsmodels comparison")
    parser.add_argument("--markdown", help="write the benchmarks page (all rows of --results) to this markdown file")
    parser.add_argument(
        "--results", default=str(HERE / "results.json"), help="JSON file the rows are added to (latest per label)"
    )
    parser.add_argument(
        "--notes", default=str(HERE / "notes.md"), help="a markdown file whose text is appended to the page"
    )
    parser.add_argument("--page-only", action="store_true", help="only rewrite --markdown from --results")
    parser.add_argument("--log", action="store_true", help="show fit_null's debug log (stage timings)")
    parser.add_argument(
        "--airqtl-python",
        default=os.environ.get("SNF_AIRQTL_PYTHON", "/work/venv-airqtl/bin/python"),
        help="python of a separate venv with airqtl==0.1.1 installed (for the airqtl row)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="fits per row in fresh processes; the fastest is kept")
    parser.add_argument("--label", default="", help="appended to the size name in the table (e.g. a version)")
    args = parser.parse_args(argv)

    if args.page_only:
        if not args.markdown:
            parser.error("--page-only needs --markdown")
        notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else ""
        Path(args.markdown).write_text(page(load_results(Path(args.results)), notes))
        return 0
    names = []
    for item in args.size.split(","):
        names += GROUPS.get(item, [item])
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {sorted(SIZES)} or {sorted(GROUPS)}")
    rows = []
    for name in dict.fromkeys(names):
        row = bench(name, Path(args.data_dir), statsmodels=not args.no_statsmodels, log=args.log,
                    airqtl_python=args.airqtl_python, repeat=args.repeat)  # fmt: skip
        if args.label:
            row["size"] = f"{name} ({args.label})"
        rows.append(row)
        print(json.dumps(row) if row.get("kind") else table([row]).splitlines()[-1], flush=True)
    out = table(rows) + "\n\nStage timings (s) of the fit, and the floor's parts:\n\n" + stage_table(rows)
    out += "\n\n" + first_call_table(rows) + "\n\n" + airqtl_table(rows)
    print()
    print(out)
    print(f"\n{machine()}")
    results_path = Path(args.results)
    stored = {row["size"]: row for row in load_results(results_path)}
    stored.update({row["size"]: row for row in rows})
    results_path.write_text(json.dumps(list(stored.values()), indent=1) + "\n")
    if args.markdown:
        notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else ""
        Path(args.markdown).write_text(page(list(stored.values()), notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
