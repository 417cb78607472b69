"""The ``scverse-nullfit`` command line.

``scverse-nullfit fit-null INPUT.h5ad -o OUTPUT.h5ad ...`` fits the null models of every gene and writes a copy of
the input with the results; ``scverse-nullfit demo`` (or ``fit-null --example``) runs the whole fit on the built-in
simulated example and compares the estimates with the truth. A TSV of phenotypes and covariates can stand in for the
h5ad, with the flags of the Rust ``step1-fit-null`` tool.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

PROG = "scverse-nullfit"

#: Covariates of the built-in example (see :func:`scverse_nullfit.datasets.simulate`).
EXAMPLE_COVARIATES = ["age", "sex", "cell_type", "log_counts"]
EXAMPLE_DONOR_COVARIATES = ["age", "sex"]

TRAIT_TYPES = ("quantitative", "binary", "count")


class CLIError(ValueError):
    """A bad command-line input, reported as one line without traceback."""


# ------------------------------------------------------------------------------------------------------ parser


def _list_arg(values: list[str] | None) -> list[str] | None:
    """Flatten repeated and comma-separated list options (``--covariates a,b --covariates c``)."""
    if values is None:
        return None
    out = [item.strip() for value in values for item in value.split(",")]
    return [item for item in out if item]


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_argument_group("output and logging").add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", action="store_true", help="Print errors only (no log, summary or bar).")
    verbosity.add_argument("--debug", action="store_true", help="Debug log with stage timings; tracebacks on error.")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact, fast null linear mixed models (donor random effect with a GRM) for single-cell eQTL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit = sub.add_parser(
        "fit-null",
        parents=[common],
        help="Fit the null model of every gene and write a copy of the input with the results.",
        description=(
            "Fit the null linear mixed model of every gene of INPUT.h5ad by exact REML and write a copy of it, with "
            "the results in varm/uns, to OUTPUT. INPUT is never modified. Instead of INPUT, use --example (the "
            "built-in simulated data) or --pheno-covar-file (a TSV with one row per cell, as the Rust "
            "step1-fit-null tool reads)."
        ),
    )
    fit.add_argument("input", nargs="?", metavar="INPUT.h5ad", help="Input AnnData (cells x genes).")
    fit.add_argument("-o", "--output", required=True, metavar="OUTPUT.h5ad", help="Output h5ad (written atomically).")
    fit.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    fit.add_argument(
        "--backed",
        action="store_true",
        help="Open INPUT read-only in backed mode: X stays on disk during the fit (less memory for large files).",
    )
    _add_model_args(fit)
    fit.add_argument(
        "--example", action="store_true", help="Fit the built-in example (snf.datasets.example()) instead of INPUT."
    )
    tsv = fit.add_argument_group(
        "phenotype table input (flags of the Rust step1-fit-null tool)",
        "A TSV (or CSV) with one row per cell: a sample (donor) ID column, trait columns and covariate columns. "
        "The traits become the genes of the output's X; --covariate-cols, --donor-covariate-cols and --grm-file "
        "are aliases of --covariates, --donor-covariates and --grm.",
    )
    tsv.add_argument("--pheno-covar-file", metavar="FILE.tsv", help="Table of phenotypes and covariates.")
    tsv.add_argument("--trait-name", action="append", metavar="T1[,T2...]", help="Trait column(s) to fit.")
    tsv.add_argument("--sample-id-col", metavar="COL", help="Column of donor IDs (alias of --donor-key).")
    tsv.add_argument("--cell-id-col", metavar="COL", help="Optional column of cell IDs (the output's obs_names).")
    tsv.add_argument(
        "--trait-type",
        choices=TRAIT_TYPES,
        default="quantitative",
        help="Only 'quantitative' (linear mixed model) is supported.",
    )

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="Run the whole fit on the built-in example and compare it with the simulated truth.",
        description="Same as `fit-null --example`, with OUTPUT optional.",
    )
    demo.add_argument("-o", "--output", metavar="OUTPUT.h5ad", help="Also write the fitted example here.")
    demo.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    demo.add_argument("--n-threads", type=int, metavar="N", help="Limit on BLAS threads.")
    demo.add_argument("--key-added", default="nullfit", metavar="K", help="Key of the results (default: nullfit).")
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--donor-key", default=None, metavar="COL", help="obs column of donor IDs (default: donor_id).")
    g.add_argument(
        "--grm",
        "--grm-file",
        dest="grm",
        metavar="PATH",
        help=(
            "GRM file (.grm.bin, .grm.gz, .rel, .rel.bin, .mtx, square .tsv/.csv, or PLINK .bed genotypes) or a key "
            "of INPUT's uns (default: uns['grm'])."
        ),
    )
    g.add_argument(
        "--covariates",
        "--covariate-cols",
        dest="covariates",
        action="append",
        metavar="A,B",
        help="Covariate columns (comma-separated; numeric or categorical).",
    )
    g.add_argument(
        "--donor-covariates",
        "--donor-covariate-cols",
        dest="donor_covariates",
        action="append",
        metavar="A,B",
        help="Covariates constant within donor (checked; added to --covariates if missing there).",
    )
    g.add_argument("--layer", metavar="L", help="Layer holding expression (default: X).")
    g.add_argument("--genes", metavar="FILE_OR_LIST", help="Genes to fit: a file (one per line) or a comma list.")
    g.add_argument("--tau", type=float, metavar="X", help="Fix tau for every gene instead of estimating it.")
    g.add_argument("--key-added", default="nullfit", metavar="K", help="Key of the results (default: nullfit).")
    g.add_argument("--n-threads", type=int, metavar="N", help="Limit on BLAS threads (results do not depend on it).")


# ------------------------------------------------------------------------------------------------------ inputs


def _check_output(output: str | None, overwrite: bool, inputs: Sequence[Path]) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        raise CLIError(f"output {output!r} is a directory; give a file name such as {str(out / 'result.h5ad')!r}.")
    if not out.parent.is_dir():
        raise CLIError(f"output directory {str(out.parent)!r} does not exist.")
    for path in inputs:
        if path.exists() and out.exists() and os.path.samefile(out, path):
            raise CLIError(f"output {output!r} is the input file; {PROG} never modifies its input.")
    if out.exists() and not overwrite:
        raise CLIError(f"output {output!r} already exists; pass --overwrite to replace it.")
    return out


def _read_h5ad(path: Path, *, backed: bool = False) -> AnnData:
    import anndata as ad

    if not path.exists():
        raise FileNotFoundError(f"input file {str(path)!r} not found.")
    if path.is_dir():
        raise CLIError(f"input {str(path)!r} is a directory, not an h5ad file.")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CLIError(f"could not read {str(path)!r} as an h5ad file: {_one_line(err)}") from err


def _read_genes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        with open(path) as fh:
            genes = [line.split()[0] for line in fh if line.strip() and not line.lstrip().startswith("#")]
        if not genes:
            raise CLIError(f"genes file {value!r} lists no gene.")
        return genes
    genes = _list_arg([value]) or []
    if len(genes) == 1 and os.sep in value:
        raise FileNotFoundError(f"genes file {value!r} not found.")
    if not genes:
        raise CLIError("--genes is empty.")
    return genes


def _table_sep(path: Path) -> str:
    name = str(path).lower().removesuffix(".gz")
    return "," if name.endswith(".csv") else "\t"


def _adata_from_table(
    path: Path,
    *,
    traits: list[str],
    sample_id_col: str,
    covariates: list[str],
    cell_id_col: str | None,
) -> AnnData:
    """One row per cell -> AnnData with the traits as genes in X and the other columns in obs."""
    from anndata import AnnData

    if not path.exists():
        raise FileNotFoundError(f"phenotype file {str(path)!r} not found.")
    sep = _table_sep(path)
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns
        if len(header) == 1 and len(str(header[0]).split()) > 1:  # whitespace-separated
            sep = r"\s+"
            header = pd.read_csv(path, sep=sep, nrows=0).columns
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CLIError(f"could not read {str(path)!r} as a table: {_one_line(err)}") from err
    if len(set(traits)) != len(traits):
        raise CLIError(f"--trait-name lists a trait more than once: {traits}.")
    roles = {sample_id_col: "--sample-id-col", **dict.fromkeys(traits, "--trait-name")}
    if cell_id_col is not None:
        roles[cell_id_col] = "--cell-id-col"
    for col in covariates:
        if col in roles:
            raise CLIError(f"column {col!r} is used both as a covariate and as {roles[col]}.")
    needed = list(dict.fromkeys([sample_id_col, *traits, *covariates, *([cell_id_col] if cell_id_col else [])]))
    missing = [c for c in needed if c not in header]
    if missing:
        raise KeyError(f"columns {missing} not in {str(path)!r} (columns: {list(header)[:20]}).")
    str_cols = {sample_id_col: str, **({cell_id_col: str} if cell_id_col else {})}
    try:
        table = pd.read_csv(path, sep=sep, usecols=needed, dtype=str_cols, float_precision="round_trip")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise CLIError(f"could not read {str(path)!r}: {_one_line(err)}") from err
    if table.empty:
        raise CLIError(f"{str(path)!r} has no rows.")

    Y = np.empty((len(table), len(traits)))
    for j, trait in enumerate(traits):
        values = pd.to_numeric(table[trait], errors="coerce")
        bad = values.isna() & table[trait].notna()
        if bad.any():
            example = table[trait][bad].iloc[0]
            raise CLIError(f"trait column {trait!r} of {str(path)!r} has non-numeric values (e.g. {example!r}).")
        if values.isna().any():
            raise CLIError(
                f"trait column {trait!r} of {str(path)!r} has {int(values.isna().sum())} missing values; "
                "remove those rows (all traits share the cells)."
            )
        Y[:, j] = values.to_numpy(dtype=np.float64)

    obs = table[[c for c in needed if c not in traits and c != cell_id_col]].copy()
    for col in obs.columns:
        if obs[col].dtype == object or pd.api.types.is_string_dtype(obs[col].dtype):
            obs[col] = obs[col].astype("category")
    if cell_id_col is not None:
        cells = table[cell_id_col].astype(str)
        if cells.duplicated().any():
            raise CLIError(
                f"--cell-id-col {cell_id_col!r} has duplicated cell IDs (e.g. {cells[cells.duplicated()].iloc[0]!r})."
            )
        obs.index = pd.Index(cells.to_numpy(), name=None)
    else:
        obs.index = pd.Index([f"cell{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=pd.Index([str(t) for t in traits]))
    return AnnData(X=Y, obs=obs, var=var)


# ------------------------------------------------------------------------------------------------------ output


def _write_atomic(adata: AnnData, out: Path, *, overwrite: bool) -> None:
    """Write to a temporary file in OUTPUT's folder, then rename it; nothing is left behind on failure."""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        adata.write_h5ad(tmp)
        if out.exists() and not overwrite:  # appeared while fitting
            raise CLIError(f"output {str(out)!r} already exists; pass --overwrite to replace it.")
        os.replace(tmp, out)
    finally:
        with suppress(OSError):
            tmp.unlink()


def _summary(
    adata: AnnData, key: str, *, wall: float, output: Path | None, input_desc: str, show_truth: bool
) -> list[str]:
    from .get import nullfit_df

    res = nullfit_df(adata, key)
    uns = adata.uns[key]
    fitted = res["tau"].notna().to_numpy()
    n_fit = int(fitted.sum())
    h2 = res["h2"].to_numpy()[fitted]
    names = list(np.asarray(uns["covariate_names"]))
    lines = [
        f"{PROG} fit-null: {input_desc}",
        f"  genes fitted      {n_fit} of {adata.n_vars} ({int(uns['n_cells'])} cells, {len(uns['donors'])} donors, "
        f"design: {', '.join(names)})",
        f"  converged         {int(res['converged'].sum())} of {n_fit}",
        f"  median h2         {np.median(h2):.3f}" if n_fit else "  median h2         -",
        f"  at tau = 0        {int((res['tau'].to_numpy()[fitted] == 0).sum())}",
        f"  wall time         {wall:.2f} s",
    ]
    dropped = list(np.asarray(uns.get("dropped_covariates", [])))
    if dropped:
        lines.append(f"  dropped columns   {', '.join(dropped)} (constant or collinear)")
    if output is None:
        lines.append("  results           not written (pass -o OUTPUT.h5ad to save them)")
    else:
        lines.append(
            f"  results           {output}: varm['{key}'] (per-gene table), varm['{key}_beta'], "
            f"varm['{key}_xhx_inv'], varm['{key}_resid_rot'], uns['{key}']"
        )
    if show_truth and "true_h2" in adata.var.columns and n_fit > 1:
        lines += _truth_lines(res[fitted], adata.var.loc[fitted, "true_h2"].to_numpy(dtype=np.float64))
    return lines


def _truth_lines(res: pd.DataFrame, true_h2: np.ndarray) -> list[str]:
    h2 = res["h2"].to_numpy()
    pval = res["h2_pval"].to_numpy()
    corr = np.corrcoef(h2, true_h2)[0, 1] if np.std(h2) > 0 and np.std(true_h2) > 0 else np.nan
    null = true_h2 == 0
    lines = [
        "  compared with the simulated truth (var['true_h2']):",
        f"    correlation of h2 with true h2     {corr:.3f} over {len(h2)} genes",
        f"    mean h2                            {h2.mean():.3f} (true mean {true_h2.mean():.3f})",
    ]
    if null.any():
        lines.append(
            f"    null genes (true h2 = 0)           {int(null.sum())}: {np.mean(pval[null] < 0.05):.1%} with "
            f"h2_pval < 0.05 (calibrated: about 5%), median h2_pval {np.median(pval[null]):.2f}"
        )
    if (~null).any():
        lines.append(
            f"    heritable genes (true h2 > 0)      {int((~null).sum())}: {np.mean(pval[~null] < 0.05):.1%} with "
            "h2_pval < 0.05 (power)"
        )
    return lines


# ------------------------------------------------------------------------------------------------------ commands


def _run_fit(args: argparse.Namespace) -> int:
    import scverse_nullfit as snf

    t0 = time.perf_counter()
    example = getattr(args, "example", False) or args.command == "demo"
    table = getattr(args, "pheno_covar_file", None)
    input_path = getattr(args, "input", None)

    trait_type = getattr(args, "trait_type", "quantitative")
    if trait_type != "quantitative":
        raise CLIError(
            f"--trait-type {trait_type} is not supported yet: {PROG} fits linear mixed models of quantitative "
            "traits (e.g. log-normalised expression); use --trait-type quantitative."
        )
    sources = [
        name for name, given in (("INPUT", input_path), ("--example", example), ("--pheno-covar-file", table)) if given
    ]
    if len(sources) > 1:
        raise CLIError(f"give only one of INPUT, --example and --pheno-covar-file (got {' and '.join(sources)}).")
    if not sources:
        raise CLIError("no input: give INPUT.h5ad, --example or --pheno-covar-file FILE.tsv.")
    donor_key = getattr(args, "donor_key", None)
    sample_id_col = getattr(args, "sample_id_col", None)
    if donor_key and sample_id_col and donor_key != sample_id_col:
        raise CLIError(f"--donor-key {donor_key!r} and --sample-id-col {sample_id_col!r} disagree; give one of them.")
    donor_key = donor_key or sample_id_col or "donor_id"
    covariates = _list_arg(getattr(args, "covariates", None))
    donor_covariates = _list_arg(getattr(args, "donor_covariates", None))
    traits = _list_arg(getattr(args, "trait_name", None))
    genes = _read_genes(getattr(args, "genes", None))
    grm = getattr(args, "grm", None)
    cell_id_col = getattr(args, "cell_id_col", None)
    if cell_id_col and not table:
        raise CLIError("--cell-id-col applies to --pheno-covar-file input only.")

    inputs = [Path(p) for p in (input_path, table) if p]
    out = _check_output(args.output, args.overwrite, inputs)

    from scanpy import logging as logg

    if example:
        adata = snf.datasets.example()
        if covariates is None and donor_covariates is None:
            covariates, donor_covariates = list(EXAMPLE_COVARIATES), list(EXAMPLE_DONOR_COVARIATES)
        input_desc = "built-in example (snf.datasets.example())"
        logg.info(f"built-in example: {adata.n_obs} cells, {adata.n_vars} genes; covariates {covariates}")
    elif table:
        if traits is None:
            raise CLIError("--pheno-covar-file needs --trait-name T1[,T2...].")
        if genes is not None:
            raise CLIError("with --pheno-covar-file, choose the traits with --trait-name, not --genes.")
        if grm is None:
            raise CLIError("--pheno-covar-file needs --grm-file PATH (there is no uns['grm'] in a table).")
        adata = _adata_from_table(
            Path(table),
            traits=traits,
            sample_id_col=donor_key,
            covariates=list(dict.fromkeys([*(covariates or []), *(donor_covariates or [])])),
            cell_id_col=cell_id_col,
        )
        input_desc = f"{table} ({adata.n_obs} rows, {adata.n_vars} traits)"
        logg.info(f"read {table}: {adata.n_obs} cells, traits {traits}")
    else:
        if traits is not None:
            if genes is not None:
                raise CLIError("give --genes or --trait-name, not both.")
            genes = traits
        adata = _read_h5ad(Path(input_path), backed=getattr(args, "backed", False))
        input_desc = f"{input_path} ({adata.n_obs} cells, {adata.n_vars} genes{', backed' if adata.isbacked else ''})"
        logg.info(f"read {input_path}: {adata.n_obs} cells x {adata.n_vars} genes")

    try:
        return _fit_and_write(
            adata,
            args,
            grm=grm,
            donor_key=donor_key,
            covariates=covariates,
            donor_covariates=donor_covariates,
            genes=genes,
            out=out,
            input_path=input_path,
            input_desc=input_desc,
            t0=t0,
        )
    finally:
        if adata.isbacked:
            adata.file.close()


def _fit_and_write(
    adata: AnnData,
    args: argparse.Namespace,
    *,
    grm: str | None,
    donor_key: str,
    covariates: list[str] | None,
    donor_covariates: list[str] | None,
    genes: list[str] | None,
    out: Path | None,
    input_path: str | None,
    input_desc: str,
    t0: float,
) -> int:
    """Fit, write OUTPUT atomically and print the summary."""
    from scanpy import logging as logg

    import scverse_nullfit as snf

    if grm is None:
        if "grm" not in adata.uns:
            raise CLIError(f"no --grm given and {input_path or 'the input'} has no uns['grm']; pass --grm PATH.")
        grm = "grm"

    snf.tl.fit_null(
        adata,
        donor_key=donor_key,
        grm=grm,
        covariates=covariates or [],
        donor_covariates=donor_covariates,
        layer=getattr(args, "layer", None),
        genes=genes,
        tau=getattr(args, "tau", None),
        key_added=args.key_added,
        n_threads=args.n_threads,
    )
    if out is not None:
        t_write = logg.info(f"writing {out}")
        _write_atomic(adata, out, overwrite=args.overwrite)
        logg.info(f"    wrote {out}", time=t_write)
    if not args.quiet:
        wall = time.perf_counter() - t0
        lines = _summary(adata, args.key_added, wall=wall, output=out, input_desc=input_desc, show_truth=True)
        print("\n".join(lines), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------- main


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        msg = err.args[0]
    else:
        msg = str(err) or type(err).__name__
    return " ".join(msg.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scverse-nullfit`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    The exit status: 0 on success, 2 on bad input (with a one-line message on stderr), 1 on an unexpected error.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help, --version or a usage error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2

    from scanpy import settings

    old_verbosity, old_logfile = settings.verbosity, settings.logfile
    settings.verbosity = 0 if args.quiet else 4 if args.debug else 2
    settings.logfile = sys.stderr  # the current stream (scanpy keeps the one it saw at import)

    def show(message, category, filename, lineno, file=None, line=None):
        if not args.quiet:
            text = f"{category.__name__}: {message}" if args.debug else str(message)
            print(f"{PROG}: warning: {' '.join(text.split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return _run_fit(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, ImportError) as err:  # FileNotFoundError is an OSError
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        settings.verbosity = old_verbosity
        settings.logfile = old_logfile


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
