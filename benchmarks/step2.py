"""Benchmark ``scverse_nullfit.tl.cis_map`` by genotype input format: the same dosages as an in-memory DataFrame,
PLINK 1 ``.bed``, PLINK 2 ``.pgen``, an indexed ``.vcf.gz`` and BGEN v1.2.

Usage::

    python benchmarks/step2.py                         # 1,000 donors, 1,000 genes, 20,000 variants, 1 Mb windows
    python benchmarks/step2.py --markdown benchmarks/step2.md

The fitted h5ad and the genotype files are generated once in ``--data-dir`` and reused. Every measurement runs in a
fresh process (``--child FORMAT``), which reports the wall time of the ``cis_map`` call (file metadata read
included: the call takes the path), its peak resident memory and the time to read the same windows' dosages
alone through the package's reader (``read``). The ``.bed`` file holds the hard calls (rounded dosages), the others
the dosages; BGEN needs ``plink2`` on the PATH to be written (its row is skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
FORMATS = ("dataframe", "bed", "pgen", "vcf.gz", "bgen")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def data_dir(root: Path, donors: int, genes: int, variants: int) -> Path:
    return root / f"step2_{donors}x{genes}x{variants}"


def dosages(donors: int, variants: int, seed: int = 0, chunk: int = 2000):
    """Variant chunks (variants x donors) of dosages: binomial(2, maf) plus imputation-like noise, 3 decimals."""
    rng = np.random.default_rng(seed)
    for v0 in range(0, variants, chunk):
        k = min(chunk, variants - v0)
        maf = rng.uniform(0.05, 0.5, k)
        d = rng.binomial(2, maf[:, None], size=(k, donors)) + rng.normal(0, 0.08, (k, donors))
        yield v0, np.clip(d, 0, 2).round(3)


def ensure_data(root: Path, donors: int, genes: int, variants: int) -> Path:
    """The fitted h5ad and the genotype files (one chromosome, one variant per kb), written once."""
    import scverse_nullfit as snf

    d = data_dir(root, donors, genes, variants)
    if (d / "done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"generating {d} ...", file=sys.stderr, flush=True)
    pos = 1_000 * (1 + np.arange(variants))
    ids = np.array([f"v{i}" for i in range(variants)])
    donor_ids = [f"D{i:04d}" for i in range(donors)]

    adata = snf.datasets.simulate(n_donors=donors, cells_per_donor=5.0, n_genes=genes, seed=1, n_cis_variants=0)
    adata.obs["donor_id"] = adata.obs["donor_id"].map(dict(zip(adata.uns["grm"].index, donor_ids, strict=True)))
    adata.uns["grm"].index = adata.uns["grm"].columns = donor_ids
    del adata.uns["genotypes"], adata.uns["variants"]
    rng = np.random.default_rng(2)
    adata.var["chrom"] = "1"
    adata.var["start"] = np.sort(rng.integers(pos[0], pos[-1], genes))
    snf.tl.fit_null(adata, covariates=["age", "sex"], donor_covariates=["age", "sex"])
    adata.write_h5ad(d / "fitted.h5ad")

    # dosages: a DataFrame (.npy), .vcf.gz (DS), .pgen (dosages), .bed (hard calls)
    import bed_reader
    import pgenlib
    import pysam

    full = np.empty((donors, variants), dtype=np.float64)
    writer = pgenlib.PgenWriter(
        str(d / "geno.pgen").encode(), donors, variant_ct=variants, nonref_flags=False, dosage_present=True
    )
    with open(d / "geno.vcf", "w") as fh:
        fh.write("##fileformat=VCFv4.2\n##contig=<ID=1,length=300000000>\n")
        fh.write('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n')
        fh.write('##FORMAT=<ID=DS,Number=A,Type=Float,Description="Alt dosage">\n')
        fh.write("#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(donor_ids) + "\n")
        calls = np.array(["0/0", "0/1", "1/1"])
        for v0, D in dosages(donors, variants):
            full[:, v0 : v0 + len(D)] = D.T
            for j, row in enumerate(D):
                writer.append_dosages(np.ascontiguousarray(row))
                fields = np.char.add(np.char.add(calls[np.rint(row).astype(int)], ":"), row.astype(str))
                fh.write(f"1\t{pos[v0 + j]}\t{ids[v0 + j]}\tA\tG\t.\t.\t.\tGT:DS\t" + "\t".join(fields) + "\n")
    writer.close()
    pysam.tabix_index(str(d / "geno.vcf"), preset="vcf", force=True)  # bgzips to geno.vcf.gz, then indexes
    (d / "geno.pvar").write_text(
        "#CHROM\tPOS\tID\tREF\tALT\n" + "".join(f"1\t{p}\t{i}\tA\tG\n" for p, i in zip(pos, ids, strict=True))
    )
    (d / "geno.psam").write_text("#IID\n" + "\n".join(donor_ids) + "\n")
    np.save(d / "dosages.npy", full)
    pd.DataFrame({"chrom": "1", "pos": pos}, index=ids).to_csv(d / "variants.tsv", sep="\t")
    bed_reader.to_bed(
        d / "geno.bed",
        np.rint(full).astype(np.float32),
        properties={"iid": donor_ids, "sid": ids, "chromosome": ["1"] * variants, "bp_position": pos,
                    "allele_1": ["G"] * variants, "allele_2": ["A"] * variants},
    )  # fmt: skip
    if shutil.which("plink2"):
        subprocess.run(
            ["plink2", "--pfile", "geno", "--export", "bgen-1.2", "bits=8", "ref-first", "--out", "geno"],
            cwd=d,
            check=True,
            capture_output=True,
        )
    (d / "done").write_text("ok\n")
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return d


def child(fmt: str, d: Path, window: int) -> dict:
    import anndata as ad

    import scverse_nullfit as snf

    adata = ad.read_h5ad(d / "fitted.h5ad")
    variants = None
    if fmt == "dataframe":
        ids = pd.read_csv(d / "variants.tsv", sep="\t", index_col=0)
        t_load = time.perf_counter()
        geno = pd.DataFrame(np.load(d / "dosages.npy"), index=adata.uns["nullfit"]["donors"], columns=ids.index)
        load = time.perf_counter() - t_load
        variants = ids
    else:
        geno = str(d / {"bed": "geno.bed", "pgen": "geno.pgen", "vcf.gz": "geno.vcf.gz", "bgen": "geno.bgen"}[fmt])
        load = 0.0
    t0 = time.perf_counter()
    snf.tl.cis_map(adata, geno, window=window, variants=variants)
    wall = time.perf_counter() - t0
    out = {"format": fmt, "wall": wall, "load": load, "peak_gb": peak_gb(), "tests": len(snf.get.cis_df(adata))}
    if fmt != "dataframe":
        out["read"] = read_windows(geno, adata, window)
    out["size_mb"] = (
        sum(p.stat().st_size for p in d.glob("geno.*") if p.suffix in _suffixes(fmt)) / 1e6
        if fmt != "dataframe"
        else (d / "dosages.npy").stat().st_size / 1e6
    )
    return out


def _suffixes(fmt: str) -> tuple[str, ...]:
    return {
        "bed": (".bed", ".bim", ".fam"),
        "pgen": (".pgen", ".pvar", ".psam"),
        "vcf.gz": (".gz", ".tbi"),
        "bgen": (".bgen", ".sample"),
    }[fmt]


def read_windows(path: str, adata, window: int) -> float:
    """Time to open the file and read the dosages of every variant within ``window`` of a gene, in chunks."""
    import scverse_nullfit as snf

    t0 = time.perf_counter()
    g_pos = adata.var["start"].to_numpy()
    lo, hi = g_pos.min() - window, g_pos.max() + window
    kwargs = {"regions": [("1", lo, hi)]} if path.endswith(".vcf.gz") else {}
    reader = snf.io.open_genotypes(path, **kwargs)
    cols = reader.variant_indices("1", lo, hi)
    for c0 in range(0, len(cols), 2048):
        reader.read(None, cols[c0 : c0 + 2048])
    return time.perf_counter() - t0


def table(rows: list[dict]) -> str:
    base = next((r["wall"] for r in rows if r["format"] == "dataframe"), None)
    lines = [
        "| input | file size (MB) | cis_map wall (s) | read the windows alone (s) | peak (GB) | tests "
        "| wall / DataFrame |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        read = f"{r['read']:.2f}" if "read" in r else "-"
        ratio = f"{r['wall'] / base:.2f}" if base else "-"
        lines.append(
            f"| {r['format']} | {r['size_mb']:.1f} | {r['wall']:.2f} | {read} | {r['peak_gb']:.2f} | {r['tests']:,} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def machine() -> str:
    sys.path.insert(0, str(HERE))
    from run import machine as run_machine

    return run_machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--donors", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1_000_000)
    parser.add_argument("--data-dir", default=os.environ.get("SNF_BENCH_DATA", "/tmp/scverse_nullfit_bench"))
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {FORMATS}")
    parser.add_argument("--markdown", help="write the table (with a heading) to this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    d = data_dir(Path(args.data_dir), args.donors, args.genes, args.variants)
    if args.child:
        print(json.dumps(child(args.child, d, args.window)))
        return 0
    ensure_data(Path(args.data_dir), args.donors, args.genes, args.variants)
    rows = []
    for fmt in args.formats.split(","):
        if fmt == "bgen" and not (d / "geno.bgen").exists():
            print("skipping bgen (plink2 was not available to write it)", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--child", fmt]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    if args.markdown:
        head = (
            f"## cis map by genotype format\n\n{args.donors:,} donors, {args.genes:,} fitted genes, "
            f"{args.variants:,} variants (one per kb on one chromosome), cis windows of +-{args.window:,} bp: every "
            "format holds the same dosages (the .bed their hard calls), and every row makes the same tests. "
            "Generated by `benchmarks/step2.py`; each row in a fresh process.\n\n"
            "- **cis_map wall**: the whole call on the file's path (opening it and reading its metadata included); "
            "the DataFrame row starts from dosages already in memory (`np.load` not counted).\n"
            "- **read the windows alone**: opening the file and reading, in chunks, the dosages of every variant "
            "the map tests, through the package's reader and nothing else: the part of the wall time that depends "
            "on the format. The indexed `.vcf.gz` is read only in the genes' windows, but parsing VCF text is "
            "the slowest; PLINK files are the fastest.\n"
            "- **peak**: the process's peak resident memory (the DataFrame row holds all dosages in memory).\n\n"
            "The machine is shared (2 cores, other jobs running), so times vary by tens of percent between runs.\n\n"
        )
        Path(args.markdown).write_text(head + text + f"\n\nMachine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
