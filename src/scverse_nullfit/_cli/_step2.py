"""The ``score-test``, ``cis-map`` and ``trans-map`` commands: a fitted h5ad and a genotype file in, TSV or Parquet
tables out.

Every input is checked before the work starts; tables are written to temporary files beside their outputs and
renamed into place only when all of them are complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._provenance import CELLS
from ._common import PROG, CLIError, atomic_output, check_output_path, one_line, read_id_list
from ._fit_null import _read_genes

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

#: Table formats, by output suffix (case-insensitive).
TSV_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MISSING = "writing Parquet needs the optional package pyarrow: pip install 'scverse-nullfit[parquet]'"


def check_table_output(value: str | None, overwrite: bool, inputs: list[Path], what: str = "output") -> Path | None:
    """An output table path checked before any work: a known suffix, an existing folder, not an input, not in
    the way (unless ``overwrite``); Parquet needs pyarrow."""
    if value is None:
        return None
    out = Path(value)
    name = out.name.lower()
    if not name.endswith(TSV_SUFFIXES + PARQUET_SUFFIXES):
        raise CLIError(f"{what} {value!r} must end in .tsv, .tsv.gz or .parquet (the table format follows it).")
    check_output_path(value, overwrite, inputs, what=what, example="results.tsv")
    if name.endswith(PARQUET_SUFFIXES):
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise ImportError(PARQUET_MISSING) from err
    return out


def write_tables(tables: list[tuple[pd.DataFrame, Path]], *, overwrite: bool) -> None:
    """Write every table to a temporary file in its output's folder, then rename them all into place.

    TSV (gzipped for ``.gz``) has a header line, tab-separated values and ``NA`` for missing values; Parquet keeps
    the column types. On any failure, or SIGTERM/SIGINT, the temporary files are removed and no output is replaced
    (see :func:`._common.atomic_output`).
    """
    with ExitStack() as stack:
        temps = [stack.enter_context(atomic_output(out)) for _, out in tables]
        for (df, out), tmp in zip(tables, temps, strict=True):
            if out.name.lower().endswith(PARQUET_SUFFIXES):
                df.to_parquet(tmp, index=False)
            else:
                compression = "gzip" if out.name.lower().endswith(".gz") else None
                df.to_csv(tmp, sep="\t", index=False, na_rep="NA", compression=compression)
        for _, out in tables:
            if out.exists() and not overwrite:  # appeared while computing
                raise CLIError(f"output {str(out)!r} already exists; pass --overwrite to replace it.")
        for (_, out), tmp in zip(tables, temps, strict=True):
            os.replace(tmp, out)


def read_fitted(path: Path, key: str) -> AnnData:
    """The parts of a fit-null output that step 2 needs, without the expression: ``var``, ``varm``, ``uns[key]`` and,
    for the check that the fit describes these cells, the cell names and their donor column."""
    import anndata as ad
    import h5py
    import pandas as pd

    if not path.exists():
        raise FileNotFoundError(f"input file {str(path)!r} not found.")
    if path.is_dir():
        raise CLIError(f"input {str(path)!r} is a directory, not an h5ad file.")
    try:
        with h5py.File(path, "r") as f:
            var = ad.io.read_elem(f["var"])
            varm = ad.io.read_elem(f["varm"]) if "varm" in f else {}
            uns = {key: ad.io.read_elem(f["uns"][key])} if "uns" in f and key in f["uns"] else {}
            obs = _read_obs(f["obs"], uns.get(key, {}))
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CLIError(f"could not read {str(path)!r} as an h5ad file: {one_line(err)}") from err
    if key not in uns:
        raise CLIError(
            f"{str(path)!r} has no null-model fit under key {key!r}; run `{PROG} fit-null` on it first "
            "(or pass the --key-added it used as --key)."
        )
    return ad.AnnData(obs=obs if isinstance(obs, pd.DataFrame) else None, var=var, varm=varm, uns=uns)


def _read_obs(group, fit) -> pd.DataFrame:
    """The cell names and the donor column the fit recorded, from an h5ad's ``obs`` group (not the other columns)."""
    import anndata as ad
    import pandas as pd

    index_name = group.attrs.get("_index")
    if index_name is None or index_name not in group:
        return ad.io.read_elem(group)
    names = pd.Index(np.asarray(ad.io.read_elem(group[index_name])).astype(str))
    record = fit.get(CELLS, {}) if isinstance(fit, dict) else {}
    donor_key = str(record.get("donor_key", "")) if isinstance(record, dict) else ""
    columns = {donor_key: ad.io.read_elem(group[donor_key])} if donor_key and donor_key in group else {}
    return pd.DataFrame(columns, index=names)


def genotype_source(value: str) -> str | AnnData:
    """GENOTYPES as the tools take it: a genotype file's path (checked to exist and to have a known format), or a
    donors x variants ``.h5ad`` opened backed."""
    from ..io._genotypes import GENOTYPE_SUFFIXES, reader_class

    path = Path(value)
    if value.lower().endswith(".h5ad"):
        import anndata as ad

        if not path.is_file():
            raise FileNotFoundError(f"genotype file {value!r} not found.")
        try:
            return ad.read_h5ad(path, backed="r")
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise CLIError(f"could not read {value!r} as an h5ad file: {one_line(err)}") from err
    prefix = [s for s in (".pgen", ".bed") if Path(f"{value}{s}").is_file()]
    if reader_class(value) is None and not prefix:
        if not path.exists():
            raise FileNotFoundError(f"genotype file {value!r} not found (nor {value}.pgen or {value}.bed).")
        raise CLIError(
            f"cannot tell the format of genotype file {value!r}: expected {', '.join(GENOTYPE_SUFFIXES)}, a PLINK "
            "prefix or a donors x variants .h5ad."
        )
    if reader_class(value) is not None and not path.is_file():
        raise FileNotFoundError(f"genotype file {value!r} not found.")
    return value


def read_variant_positions(value: str | None) -> pd.DataFrame | None:
    """A table of variants (TSV or CSV, first column the variant ID) with chromosome and position columns."""
    if value is None:
        return None
    import pandas as pd

    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"variant positions file {value!r} not found.")
    sep = "," if path.name.lower().endswith((".csv", ".csv.gz")) else "\t"
    try:
        table = pd.read_csv(path, sep=sep, index_col=0, dtype={0: str})
    except (ValueError, OSError) as err:
        raise CLIError(f"could not read variant positions {value!r}: {one_line(err)}") from err
    table.index = table.index.astype(str)
    return table


def _close(genotypes) -> None:
    """Close a backed genotype AnnData or a genotype file reader opened here."""
    if getattr(genotypes, "isbacked", False):
        with suppress(Exception):
            genotypes.file.close()
    elif hasattr(genotypes, "close"):
        genotypes.close()


def run_score_test(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    fitted = Path(args.input)
    out = check_table_output(args.output, args.overwrite, [fitted, Path(args.genotypes)])
    genes = _read_genes(args.genes)
    adata = read_fitted(fitted, args.key)
    genotypes = _open_for_score_test(adata, genotype_source(args.genotypes), args.key)
    try:
        _check_size(adata, genotypes, genes, args.max_tests)
        table = tl.score_test(
            adata,
            genotypes,
            key=args.key,
            genes=genes,
            condition=read_id_list(args.condition, "--condition"),
            chunk_size=args.chunk_size,
            n_threads=args.n_threads,
            spa=args.spa,
        )
    finally:
        _close(genotypes)
    write_tables([(table, out)], overwrite=args.overwrite)
    if not args.quiet:
        pval = table["pval"].to_numpy()
        ok = np.isfinite(pval)
        lines = [
            f"{PROG} score-test: {args.input} x {args.genotypes}",
            f"  tests             {int(ok.sum())} with a p-value, of {len(table)} "
            f"({table['gene'].nunique()} genes x {table['variant'].nunique()} variants)",
            f"  smallest p-value  {pval[ok].min():.3g}" if ok.any() else "  smallest p-value  -",
            f"  wall time         {time.perf_counter() - t0:.2f} s",
            f"  results           {out}",
        ]
        print("\n".join(lines), flush=True)
    return 0


def _check_distinct(outputs, names: str) -> None:
    """Refuse two output options naming the same file."""
    given = [path.absolute() for path in outputs if path is not None]
    if len(set(given)) < len(given):
        raise CLIError(f"{names} must be different files.")


def _read_inputs(args: argparse.Namespace, fitted: Path):
    """A mapping command's fitted AnnData, genotype source, and the keyword arguments every mapping tool takes."""
    common = {
        "key": args.key,
        "genes": _read_genes(args.genes),
        "variants": read_variant_positions(args.variant_positions),
        "chunk_size": args.chunk_size,
        "n_threads": args.n_threads,
        "spa": args.spa,
    }
    return read_fitted(fitted, args.key), genotype_source(args.genotypes), common


def _open_for_score_test(adata: AnnData, genotypes, key: str):
    """A genotype file opened once (only the fit's donors), so that its size can be checked before the tests."""
    if not isinstance(genotypes, str):
        return genotypes
    import pandas as pd

    from ..io._genotypes import sample_options
    from ..tl._step2 import open_genotypes

    donors = pd.Index([str(d) for d in np.asarray(adata.uns[key]["donors"])])
    return open_genotypes(genotypes, **sample_options(genotypes, donors))


def _check_size(adata: AnnData, genotypes, genes: list[str] | None, max_tests: int | None) -> None:
    """Refuse a score-test table larger than --max-tests rows (it is held in memory) before computing it."""
    if not max_tests or max_tests <= 0:
        return
    n_variants = genotypes.var.shape[0] if hasattr(genotypes, "var") else 0
    n_genes = adata.n_vars if genes is None else len(genes)
    if n_genes * n_variants > max_tests:
        raise CLIError(
            f"score-test would write {n_genes:,} genes x {n_variants:,} variants = {n_genes * n_variants:,} rows, more "
            f"than --max-tests {max_tests:,} (the table is held in memory): choose genes with --genes, map cis "
            "windows with cis-map, or raise --max-tests."
        )


def run_cis_map(args: argparse.Namespace) -> int:
    from .. import get, tl

    t0 = time.perf_counter()
    fitted = Path(args.input)
    inputs = [fitted, Path(args.genotypes), *([Path(args.variant_positions)] if args.variant_positions else [])]
    out = check_table_output(args.output, args.overwrite, inputs)
    genes_out = check_table_output(args.genes_output, args.overwrite, inputs, what="--genes-output")
    signals_out = check_table_output(args.independent_output, args.overwrite, inputs, what="--independent-output")
    _check_distinct((out, genes_out, signals_out), "-o, --genes-output and --independent-output")
    tensorqtl = _check_tensorqtl_prefix(args.tensorqtl, args.overwrite)
    adata, genotypes, common = _read_inputs(args, fitted)
    try:
        tl.cis_map(
            adata,
            genotypes,
            **common,
            window=args.window,
            chrom_key=args.chrom_key,
            pos_key=args.pos_key,
            variant_chrom_key=args.variant_chrom_key,
            variant_pos_key=args.variant_pos_key,
            key_added="cis",
            fdr=args.fdr,
            fdr_method=args.fdr_method,
            gene_pval=args.gene_pval,
            independent=signals_out is not None,
        )
    finally:
        _close(genotypes)
    table = get.cis_df(adata, "cis")
    summary = get.cis_genes_df(adata, "cis")
    tables = [(table, out)]
    if genes_out is not None:
        tables.append((summary.rename_axis("gene").reset_index(), genes_out))
    if signals_out is not None:
        tables.append((get.cis_independent_df(adata, "cis"), signals_out))
    if tensorqtl is not None:
        tables += _tensorqtl_tables(adata, tensorqtl, args.overwrite, inputs)
    write_tables(tables, overwrite=args.overwrite)
    if not args.quiet:
        tested = summary["n_variants"].to_numpy() > 0
        n_egenes = int(summary["is_egene"].sum()) if "is_egene" in summary.columns else None
        lines = [
            f"{PROG} cis-map: {args.input} x {args.genotypes} (window {args.window:,} bp)",
            f"  genes tested      {int(tested.sum())} of {adata.n_vars} ({len(table)} gene-variant tests)",
            f"  eGenes            {n_egenes} at FDR {args.fdr:g} ({args.gene_pval} gene p-values, {args.fdr_method})"
            if n_egenes is not None
            else "",
            f"  wall time         {time.perf_counter() - t0:.2f} s",
            "  results           " + "; ".join(str(path) for _, path in tables),
        ]
        print("\n".join(line for line in lines if line), flush=True)
    return 0


def run_trans_map(args: argparse.Namespace) -> int:
    from .. import get, tl

    t0 = time.perf_counter()
    fitted = Path(args.input)
    inputs = [fitted, Path(args.genotypes), *([Path(args.variant_positions)] if args.variant_positions else [])]
    outputs = [
        (check_table_output(value, args.overwrite, inputs, what=what), what)
        for value, what in ((args.output, "output"), (args.genes_output, "--genes-output"),
                            (args.variants_output, "--variants-output"))
    ]  # fmt: skip
    _check_distinct([out for out, _ in outputs], "-o, --genes-output and --variants-output")
    trans_tqtl = _check_trans_tensorqtl(args.tensorqtl, args.overwrite, inputs)
    adata, genotypes, common = _read_inputs(args, fitted)
    try:
        tl.trans_map(adata, genotypes, **common, pval_threshold=args.pval_threshold, key_added="trans")
    finally:
        _close(genotypes)
    table = get.trans_df(adata, "trans")
    per_gene = adata.varm["trans"].rename_axis("gene").reset_index()
    per_variant = adata.uns["trans"]["variants"].rename_axis("variant").reset_index()
    (out, _), (genes_out, _), (variants_out, _) = outputs
    tables = [(df, path) for df, path in ((table, out), (per_gene, genes_out), (per_variant, variants_out)) if path]
    if trans_tqtl is not None:
        from ..get import tensorqtl_df

        tables.append((tensorqtl_df(table, kind="trans"), trans_tqtl))
    write_tables(tables, overwrite=args.overwrite)
    if not args.quiet:
        params = adata.uns["trans"]["params"]
        pval = table["pval"].to_numpy()
        lines = [
            f"{PROG} trans-map: {args.input} x {args.genotypes} (p < {args.pval_threshold:g})",
            f"  tested            {int(params['n_genes_tested'])} genes x {int(params['n_variants'])} variants",
            f"  kept              {len(table)} pairs ({table['gene'].nunique()} genes)",
            f"  smallest p-value  {pval.min():.3g}" if len(pval) else "  smallest p-value  -",
            f"  wall time         {time.perf_counter() - t0:.2f} s",
            "  results           " + "; ".join(str(path) for _, path in tables),
        ]
        print("\n".join(lines), flush=True)
    return 0


def _check_tensorqtl_prefix(value: str | None, overwrite: bool) -> Path | None:
    """The --tensorqtl prefix, checked before any work: an existing folder, no gene table in the way (the
    per-chromosome files are checked once the chromosomes are known), and pyarrow for its Parquet files."""
    if value is None:
        return None
    from ..io._tensorqtl import tensorqtl_paths

    prefix = Path(value)
    if not prefix.parent.is_dir():
        raise CLIError(f"--tensorqtl directory {str(prefix.parent)!r} does not exist.")
    genes = tensorqtl_paths(prefix)["genes"]
    if genes.exists() and not overwrite:
        raise CLIError(f"--tensorqtl output {str(genes)!r} already exists; pass --overwrite to replace it.")
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise ImportError(PARQUET_MISSING) from err
    return prefix


def _check_trans_tensorqtl(value: str | None, overwrite: bool, inputs: list[Path]) -> Path | None:
    """trans-map's --tensorqtl output, ``PREFIX.trans_qtl_pairs.parquet``, checked before any work."""
    if value is None:
        return None
    from ..io._tensorqtl import tensorqtl_paths

    path = tensorqtl_paths(value)["trans"]
    return check_table_output(str(path), overwrite, inputs, what="--tensorqtl output")


def _tensorqtl_tables(adata: AnnData, prefix: Path, overwrite: bool, inputs: list[Path]) -> list[tuple]:
    """tensorQTL's nominal pairs per chromosome and gene table, with the paths tensorQTL gives them."""
    from ..get import tensorqtl_df
    from ..io._tensorqtl import tensorqtl_paths

    nominal = tensorqtl_df(adata, "cis", kind="nominal", by_chrom=True)
    paths = tensorqtl_paths(prefix, list(nominal))
    tables = [(df, paths[f"nominal:{chrom}"]) for chrom, df in nominal.items()]
    tables.append((tensorqtl_df(adata, "cis", kind="gene"), paths["genes"]))
    if "independent" in adata.uns["cis"]:
        tables.append((tensorqtl_df(adata, "cis", kind="independent"), paths["independent"]))
    for _, path in tables:
        check_table_output(str(path), overwrite, inputs, what="--tensorqtl output")
    return tables


#: Command name -> function, for ``_main``.
STEP2_COMMANDS = {"score-test": run_score_test, "cis-map": run_cis_map, "trans-map": run_trans_map}
