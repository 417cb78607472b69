"""The phenotype table (one row per cell, flags of the Rust ``step1-fit-null`` tool) as an AnnData."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._common import CLIError, one_line

if TYPE_CHECKING:
    from anndata import AnnData


def _table_sep(path: Path) -> str:
    name = str(path).lower().removesuffix(".gz")
    return "," if name.endswith(".csv") else "\t"


def adata_from_table(
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
        raise CLIError(f"could not read {str(path)!r} as a table: {one_line(err)}") from err
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
        raise CLIError(f"could not read {str(path)!r}: {one_line(err)}") from err
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
