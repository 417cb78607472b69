"""Write association results as tensorQTL writes them (per-chromosome Parquet pairs, a gzipped gene table)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

PARQUET_MISSING = "writing Parquet files needs the optional package pyarrow: pip install 'scverse-nullfit[parquet]'"


def _pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(PARQUET_MISSING) from err


def tensorqtl_paths(prefix: str | os.PathLike, chroms=()) -> dict[str, Path]:
    """The file names tensorQTL uses under ``prefix``: ``cis_qtl_pairs.{chrom}.parquet`` per chromosome (keys
    ``"nominal:{chrom}"``), ``cis_qtl.txt.gz`` (``"genes"``), ``cis_independent_qtl.txt.gz``
    (``"independent"``) and ``trans_qtl_pairs.parquet`` (``"trans"``)."""
    prefix = os.fspath(prefix)
    out = {f"nominal:{c}": Path(f"{prefix}.cis_qtl_pairs.{c}.parquet") for c in chroms}
    out["genes"] = Path(f"{prefix}.cis_qtl.txt.gz")
    out["independent"] = Path(f"{prefix}.cis_independent_qtl.txt.gz")
    out["trans"] = Path(f"{prefix}.trans_qtl_pairs.parquet")
    return out


def write_tensorqtl(
    prefix: str | os.PathLike,
    *,
    nominal: Mapping[str, pd.DataFrame] | None = None,
    genes: pd.DataFrame | None = None,
    independent: pd.DataFrame | None = None,
    trans: pd.DataFrame | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """Write results in tensorQTL's file layout, so that scripts reading tensorQTL output work unchanged.

    The tables come from :func:`scverse_nullfit.get.tensorqtl_df`. Every file is first written to a temporary
    name in its directory and renamed into place only when all of them are written, so a failure leaves no partial
    or mixed output. Parquet needs ``pyarrow`` (``pip install 'scverse-nullfit[parquet]'``).

    Parameters
    ----------
    prefix
        Output prefix (a path without extension), as tensorQTL's ``--output_dir``/``prefix``.
    nominal
        Nominal cis pairs by chromosome (``tensorqtl_df(adata, kind="nominal", by_chrom=True)``): one
        ``{prefix}.cis_qtl_pairs.{chrom}.parquet`` per chromosome, as ``tensorqtl.cis.map_nominal`` writes.
    genes
        The per-gene table (``tensorqtl_df(adata, kind="gene")``): ``{prefix}.cis_qtl.txt.gz``, tab-separated and
        gzipped, as tensorQTL's ``cis`` mode writes.
    independent
        Independent signals (``tensorqtl_df(adata, kind="independent")``): ``{prefix}.cis_independent_qtl.txt.gz``,
        as tensorQTL's ``cis_independent`` mode writes.
    trans
        Trans pairs (``tensorqtl_df(..., kind="trans")``): ``{prefix}.trans_qtl_pairs.parquet``.
    overwrite
        Replace existing files; ``False`` makes an existing output file an error (checked before writing).

    Returns
    -------
    The paths written.
    """
    if nominal is not None and not isinstance(nominal, Mapping):
        raise ValueError(
            "nominal must be a mapping chromosome -> DataFrame, as tensorqtl_df(adata, kind='nominal', by_chrom=True) "
            f"returns, not {type(nominal).__name__}."
        )
    for name, df in [
        ("genes", genes),
        ("independent", independent),
        ("trans", trans),
        *(((f"nominal[{c!r}]", d) for c, d in (nominal or {}).items())),
    ]:
        if df is not None and not isinstance(df, pd.DataFrame):
            raise ValueError(f"{name} must be a DataFrame, not {type(df).__name__}.")
    chroms = [str(c) for c in (nominal or {})]
    bad = [c for c in chroms if not c or "/" in c or os.sep in c]
    if bad:
        raise ValueError(f"chromosome names {bad} cannot be part of a file name.")
    paths = tensorqtl_paths(prefix, chroms)
    jobs: list[tuple[Path, pd.DataFrame, str]] = [
        (paths[f"nominal:{c}"], df, "parquet") for c, df in zip(chroms, (nominal or {}).values(), strict=True)
    ]
    if genes is not None:
        jobs.append((paths["genes"], genes, "txt.gz"))
    if independent is not None:
        jobs.append((paths["independent"], independent, "txt.gz"))
    if trans is not None:
        jobs.append((paths["trans"], trans, "parquet"))
    if not jobs:
        raise ValueError("nothing to write: give nominal, genes, independent and/or trans.")
    if any(kind == "parquet" for _, _, kind in jobs):
        _pyarrow()
    for path, _, _ in jobs:
        if not path.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(path.parent)!r} does not exist.")
        if not overwrite and path.exists():
            raise FileExistsError(f"{str(path)!r} exists (pass overwrite=True to replace it).")
    written: list[tuple[Path, Path]] = []
    try:
        for path, df, kind in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            written.append((Path(tmp), path))
            if kind == "parquet":
                df.to_parquet(tmp, index=False, engine="pyarrow")
            else:
                df.to_csv(tmp, sep="\t", index=False, float_format="%.6g", compression="gzip", na_rep="NA")
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if tmp.exists():
                tmp.unlink()
    return [path for _, path in written]
