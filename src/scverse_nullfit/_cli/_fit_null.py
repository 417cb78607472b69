"""The ``fit-null`` and ``demo`` commands: inputs, the fit, the atomic write and the summary."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from ..datasets._truth import truth_report
from ._common import PROG, CLIError, atomic_output, check_output_path, list_arg, one_line, read_id_list
from ._table import adata_from_table

if TYPE_CHECKING:
    from anndata import AnnData

#: Covariates of the built-in example (see :func:`scverse_nullfit.datasets.simulate`).
EXAMPLE_COVARIATES = ["age", "sex", "cell_type", "log_counts"]
EXAMPLE_DONOR_COVARIATES = ["age", "sex"]
#: Count families on the example: its raw counts layer, with log_counts as the offset instead of a covariate.
EXAMPLE_COUNT_COVARIATES = ["age", "sex", "cell_type"]
EXAMPLE_COUNT_LAYER = "counts"
EXAMPLE_COUNT_OFFSET = "log_counts"


def _family(args: argparse.Namespace) -> str:
    """The model family from --family and the seed-compatible --trait-type (count -> poisson)."""
    family = getattr(args, "family", None)
    trait_type = getattr(args, "trait_type", None)
    if trait_type == "binary":
        raise CLIError(
            f"--trait-type binary is not supported: {PROG} fits quantitative traits (linear mixed model) and counts "
            "(--family poisson or negative_binomial)."
        )
    if trait_type == "count":
        if family == "gaussian":
            raise CLIError("--trait-type count and --family gaussian disagree; give one of them.")
        return family or "poisson"
    if trait_type == "quantitative" and family not in (None, "gaussian"):
        raise CLIError(f"--trait-type quantitative and --family {family} disagree; give one of them.")
    return family or "gaussian"


def _read_h5ad(path: Path, *, backed: bool = False) -> AnnData:
    import anndata as ad

    if not path.exists():
        raise FileNotFoundError(f"input file {str(path)!r} not found.")
    if path.is_dir():
        raise CLIError(f"input {str(path)!r} is a directory, not an h5ad file.")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CLIError(f"could not read {str(path)!r} as an h5ad file: {one_line(err)}") from err


def _read_genes(value: str | None) -> list[str] | None:
    """The --genes option: a file with one gene per line, or a comma-separated list."""
    return read_id_list(value, "--genes")


def _write_atomic(adata: AnnData, out: Path, *, overwrite: bool) -> None:
    """Write to a temporary file in OUTPUT's folder, then rename it; nothing is left behind on failure or on
    SIGTERM / SIGINT (see :func:`._common.atomic_output`)."""
    with atomic_output(out) as tmp:
        adata.write_h5ad(tmp)
        if out.exists() and not overwrite:  # appeared while fitting
            raise CLIError(f"output {str(out)!r} already exists; pass --overwrite to replace it.")
        os.replace(tmp, out)


def summary(
    adata: AnnData, key: str, *, wall: float, output: Path | None, input_desc: str, show_truth: bool
) -> list[str]:
    from ..get import nullfit_df

    res = nullfit_df(adata, key)
    uns = adata.uns[key]
    params = uns.get(Key.PARAMS, {})
    family = str(params.get("family", "gaussian")) if hasattr(params, "get") else "gaussian"
    if family in Key.COUNT_FAMILIES:
        return _count_summary(adata, res, uns, key, family, wall=wall, output=output, input_desc=input_desc)
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
    lines.append(_results_line(output, key))
    if show_truth and "true_h2" in adata.var.columns and n_fit > 1:
        eqtl = adata.var.loc[fitted, "eqtl_beta"].to_numpy(dtype=np.float64) if "eqtl_beta" in adata.var else None
        lines += truth_report(res[fitted], adata.var.loc[fitted, "true_h2"].to_numpy(dtype=np.float64), eqtl)
    return lines


def _results_line(output: Path | None, key: str) -> str:
    """The summary's line saying where the results are."""
    if output is None:
        return "  results           not written (pass -o OUTPUT.h5ad to save them)"
    return f"  results           {output}: varm['{key}'] (per-gene table), its compact projection, uns['{key}']"


def _count_summary(adata, res, uns, key, family, *, wall, output, input_desc) -> list[str]:
    fitted = res["converged"].to_numpy(dtype=bool)
    n_fit = int(fitted.sum())
    s2 = res["sigma2_g"].to_numpy()[fitted]
    names = list(np.asarray(uns["covariate_names"]))
    offset = uns[Key.PARAMS].get("offset")
    lines = [
        f"{PROG} fit-null ({family}): {input_desc}",
        f"  genes fitted      {n_fit} of {adata.n_vars} ({int(uns['n_cells'])} cells, {len(uns['donors'])} donors, "
        f"design: {', '.join(names)}; offset: {offset or 'none'})",
        f"  median sigma2_g   {np.median(s2):.3f}" if n_fit else "  median sigma2_g   -",
        f"  at sigma2_g = 0   {int((s2 == 0).sum())}",
    ]
    if family == "negative_binomial" and n_fit:
        lines.append(f"  median theta      {np.median(res['theta'].to_numpy()[fitted]):.3f}")
    lines.append(f"  wall time         {wall:.2f} s")
    lines.append(_results_line(output, key))
    if "true_count_sigma2_g" in adata.var.columns and n_fit > 2:
        truth = adata.var.loc[fitted, "true_count_sigma2_g"].to_numpy(dtype=np.float64)
        r = np.corrcoef(s2, truth)[0, 1]
        lines.append(f"  vs simulated      correlation of sigma2_g with the truth {r:.3f}")
    return lines


def run_fit(args: argparse.Namespace) -> int:
    from .. import datasets

    t0 = time.perf_counter()
    example = getattr(args, "example", False) or args.command == "demo"
    table = getattr(args, "pheno_covar_file", None)
    input_path = getattr(args, "input", None)

    family = _family(args)
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
    covariates = list_arg(getattr(args, "covariates", None))
    donor_covariates = list_arg(getattr(args, "donor_covariates", None))
    traits = list_arg(getattr(args, "trait_name", None))
    genes = _read_genes(getattr(args, "genes", None))
    grm = getattr(args, "grm", None)
    cell_id_col = getattr(args, "cell_id_col", None)
    if cell_id_col and not table:
        raise CLIError("--cell-id-col applies to --pheno-covar-file input only.")

    inputs = [Path(p) for p in (input_path, table) if p]
    out = check_output_path(args.output, args.overwrite, inputs)

    from scanpy import logging as logg

    offset = getattr(args, "offset", None)
    layer = getattr(args, "layer", None)
    if example:
        adata = datasets.example()
        count = family != "gaussian"
        if covariates is None and donor_covariates is None:
            covariates = list(EXAMPLE_COUNT_COVARIATES if count else EXAMPLE_COVARIATES)
            donor_covariates = list(EXAMPLE_DONOR_COVARIATES)
        if count:
            layer = layer or EXAMPLE_COUNT_LAYER
            offset = offset or EXAMPLE_COUNT_OFFSET
        input_desc = "built-in example (snf.datasets.example())"
        logg.info(f"built-in example: {adata.n_obs} cells, {adata.n_vars} genes; covariates {covariates}")
    elif table:
        if traits is None:
            raise CLIError("--pheno-covar-file needs --trait-name T1[,T2...].")
        if genes is not None:
            raise CLIError("with --pheno-covar-file, choose the traits with --trait-name, not --genes.")
        if grm is None:
            raise CLIError("--pheno-covar-file needs --grm-file PATH (there is no uns['grm'] in a table).")
        adata = adata_from_table(
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
            adata, args, grm=grm, donor_key=donor_key, covariates=covariates, donor_covariates=donor_covariates,
            genes=genes, family=family, offset=offset, layer=layer, out=out, input_path=input_path,
            input_desc=input_desc, t0=t0,
        )  # fmt: skip
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
    family: str,
    offset: str | None,
    layer: str | None,
    out: Path | None,
    input_path: str | None,
    input_desc: str,
    t0: float,
) -> int:
    """Fit, write OUTPUT atomically and print the summary."""
    from scanpy import logging as logg

    from .. import tl

    if grm is None:
        if "grm" not in adata.uns:
            raise CLIError(f"no --grm given and {input_path or 'the input'} has no uns['grm']; pass --grm PATH.")
        grm = "grm"

    tl.fit_null(
        adata,
        donor_key=donor_key,
        grm=grm,
        covariates=covariates or [],
        donor_covariates=donor_covariates,
        layer=layer,
        genes=genes,
        tau=getattr(args, "tau", None),
        family=family,
        offset=offset,
        key_added=args.key_added,
        n_threads=args.n_threads,
    )
    if out is not None:
        t_write = logg.info(f"writing {out}")
        _write_atomic(adata, out, overwrite=args.overwrite)
        logg.info(f"    wrote {out}", time=t_write)
    if not args.quiet:
        wall = time.perf_counter() - t0
        lines = summary(adata, args.key_added, wall=wall, output=out, input_desc=input_desc, show_truth=True)
        print("\n".join(lines), flush=True)
    return 0
