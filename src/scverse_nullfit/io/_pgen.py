"""Genotype dosages from PLINK 2 binary files (.pgen/.pvar/.psam), through the optional ``pgenlib`` package."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ._geno_common import GenotypeFile, donor_index, existing, missing_extra, strip_suffix, variant_ids

#: Missing dosages come out of pgenlib as this value.
PGEN_MISSING = -9.0


def _pgenlib():
    try:
        import pgenlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise missing_extra("PLINK 2 .pgen files", "pgenlib", "pgen") from err
    return pgenlib


def pgen_paths(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The ``.pgen``, variant (``.pvar``, ``.pvar.zst`` or ``.bim``) and sample (``.psam`` or ``.fam``) paths."""
    stem = strip_suffix(prefix, (".pgen", ".pvar.zst", ".pvar", ".psam"))
    pgen = stem.parent / f"{stem.name}.pgen"
    pvar = existing(stem, ".pvar", ".pvar.zst", ".bim")
    psam = existing(stem, ".psam", ".fam")
    for p, what in ((pgen, pgen), (pvar, f"{stem}.pvar"), (psam, f"{stem}.psam")):
        if p is None or not Path(p).is_file():
            raise FileNotFoundError(f"PLINK 2 file {str(what)!r} not found (from {os.fspath(prefix)!r}).")
    return pgen, pvar, psam  # type: ignore[return-value]


def _header_lines(path: Path) -> tuple[int, str | None]:
    """Number of ``##`` lines, and the ``#``-header line after them (None if the table has none)."""
    n = 0
    with open(path) as fh:
        for line in fh:
            if line.startswith("##"):
                n += 1
                continue
            return n, (line.rstrip("\n") if line.startswith("#") else None)
    return n, None


def read_psam(path: Path, id_column: str) -> pd.DataFrame:
    """Samples of a ``.psam`` (with its ``#FID``/``#IID`` header) or ``.fam``, indexed by donor ID."""
    skip, header = _header_lines(path)
    if header is not None:
        names = header[1:].split()
        table = pd.read_csv(path, sep=r"\s+", skiprows=skip + 1, header=None, names=names, dtype=str)
    else:  # .fam order
        cols = ["FID", "IID", "PAT", "MAT", "SEX", "PHENO1"]
        table = pd.read_csv(path, sep=r"\s+", skiprows=skip, header=None, dtype=str)
        table.columns = cols[: table.shape[1]] + [f"col{i}" for i in range(len(cols), table.shape[1])]
    if "IID" not in table.columns:
        raise ValueError(f"PLINK 2 sample file {str(path)!r} has no IID column (header: {header!r}).")
    if id_column == "fid_iid":
        if "FID" not in table.columns:
            raise ValueError(f"id_column='fid_iid' but {str(path)!r} has no FID column.")
        ids = table["FID"] + "_" + table["IID"]
    else:
        ids = table["IID"]
    hint = " (use id_column='fid_iid')" if id_column == "iid" and "FID" in table.columns else ""
    table.index = donor_index(ids, path, hint)
    table.columns = [c.lower() for c in table.columns]
    return table


def read_pvar(path: Path) -> pd.DataFrame:
    """``chrom``, ``pos``, ``id``, ``ref``, ``alt`` of a ``.pvar`` (or ``.pvar.zst`` / ``.bim``), in file order."""
    if path.name.endswith(".zst"):
        return _read_pvar_zst(path)
    skip, header = _header_lines(path)
    if header is not None:
        names = header[1:].split()
        need = ["CHROM", "POS", "ID", "REF", "ALT"]
        missing = [c for c in need if c not in names]
        if missing:
            raise ValueError(f"PLINK 2 variant file {str(path)!r} lacks the columns {missing} (header: {header!r}).")
        table = pd.read_csv(
            path, sep="\t", skiprows=skip + 1, header=None, names=names, usecols=need, dtype={"CHROM": str,
            "ID": str, "REF": str, "ALT": str}, keep_default_na=False, comment=None
        )  # fmt: skip
    else:  # .bim order: CHROM ID CM POS ALT REF (the first allele is the counted one in PLINK 1)
        table = pd.read_csv(path, sep=r"\s+", skiprows=skip, header=None, dtype=str, keep_default_na=False)
        if table.shape[1] == 6:
            table.columns = ["CHROM", "ID", "CM", "POS", "ALT", "REF"]
        elif table.shape[1] == 5:
            table.columns = ["CHROM", "ID", "POS", "ALT", "REF"]
        else:
            raise ValueError(f"PLINK variant file {str(path)!r} has {table.shape[1]} columns; expected 5 or 6.")
    try:
        pos = pd.to_numeric(table["POS"]).to_numpy(dtype=np.int64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"PLINK 2 variant file {str(path)!r} has non-integer positions: {err}") from err
    return pd.DataFrame(
        {"chrom": table["CHROM"].astype(str).to_numpy(), "pos": pos, "id": table["ID"].astype(str).to_numpy(),
         "ref": table["REF"].astype(str).to_numpy(), "alt": table["ALT"].astype(str).to_numpy()}
    )  # fmt: skip


def _read_pvar_zst(path: Path) -> pd.DataFrame:
    pgenlib = _pgenlib()
    try:
        pv = pgenlib.PvarReader(os.fsencode(path))
    except RuntimeError as err:
        raise ValueError(f"cannot read the PLINK 2 variant file {str(path)!r}: {err}") from err
    try:
        n = pv.get_variant_ct()
        rows = []
        for i in range(n):
            k = pv.get_allele_ct(i)
            alleles = [pv.get_allele_code(i, a).decode() for a in range(k)]
            rows.append(
                (pv.get_variant_chrom(i).decode(), pv.get_variant_pos(i), pv.get_variant_id(i).decode(), alleles[0],
                 ",".join(alleles[1:]))
            )  # fmt: skip
    finally:
        pv.close()
    return pd.DataFrame(rows, columns=["chrom", "pos", "id", "ref", "alt"]).astype({"pos": np.int64})


class PgenGenotypes(GenotypeFile):
    """Dosages from a PLINK 2 fileset (``.pgen`` with ``.pvar``/``.pvar.zst`` and ``.psam``), read on demand.

    Needs the optional package ``pgenlib`` (``pip install 'scverse-nullfit[pgen]'``).

    Dosages count the ``ALT`` allele of the ``.pvar`` (PLINK 2's convention): the stored dosage where there is
    one, else the hard call; missing calls become NaN. Multi-allelic variants (``ALT`` with a comma) are
    skipped: they are not in ``var`` (split them before conversion, e.g. ``bcftools norm -m-``). Variants
    without an ID (``.``) are named ``chrom:pos:ref:alt``; duplicated IDs get ``-1``, ``-2``, ... appended.

    Parameters
    ----------
    path
        The ``.pgen`` file or the fileset's prefix.
    samples
        Only these samples (those of the ``.psam`` among them, in file order); pgenlib decodes only theirs.
    id_column
        How donors are named: ``"iid"`` (the ``IID`` column, the default) or ``"fid_iid"`` (``f"{FID}_{IID}"``).

    Attributes
    ----------
    obs
        The ``.psam`` columns (lower case), indexed by donor ID.
    var
        Indexed by variant ID: ``chrom`` (as in the ``.pvar``), ``pos``, ``ref``, ``alt`` (counted), ``id``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        samples: Iterable[str] | None = None,
        id_column: Literal["iid", "fid_iid"] = "iid",
    ):
        if id_column not in ("iid", "fid_iid"):
            raise ValueError(f"id_column must be 'iid' or 'fid_iid', not {id_column!r}.")
        pgenlib = _pgenlib()
        self.path, self.pvar_path, self.psam_path = pgen_paths(path)
        every = read_psam(self.psam_path, id_column)
        subset = None
        if samples is not None:
            keep = np.flatnonzero(every.index.isin(np.asarray(list(samples)).astype(str)))
            if 0 < len(keep) < len(every):  # pgenlib then decodes only these samples (none kept: keep all)
                subset = keep.astype(np.uint32)
        self.obs = every if subset is None else every.iloc[subset]
        table = read_pvar(self.pvar_path)
        try:
            self._pgen = pgenlib.PgenReader(
                os.fsencode(self.path),
                raw_sample_ct=len(every),
                sample_subset=subset,
            )
        except RuntimeError as err:
            raise ValueError(f"cannot read the PLINK 2 file {str(self.path)!r}: {err}") from err
        n_file = self._pgen.get_variant_ct()
        if n_file != len(table):
            raise ValueError(
                f"{str(self.path)!r} holds {n_file} variants but {str(self.pvar_path)!r} lists {len(table)}."
            )
        biallelic = ~table["alt"].str.contains(",", regex=False).to_numpy()
        self._file_index = np.flatnonzero(biallelic).astype(np.uint32)
        table = table.iloc[self._file_index]
        t = {c: table[c].to_numpy() for c in table.columns}
        index = variant_ids(t["id"], t["chrom"], t["pos"], t["ref"], t["alt"])
        self.var = pd.DataFrame(
            {"chrom": t["chrom"], "pos": t["pos"], "ref": t["ref"], "alt": t["alt"], "id": t["id"]}, index=index
        )

    def _read(self, cols: np.ndarray) -> np.ndarray:
        idx = np.ascontiguousarray(self._file_index[cols], dtype=np.uint32)
        buf = np.empty((len(idx), self.shape[0]), dtype=np.float64)
        try:
            self._pgen.read_dosages_list(idx, buf)
        except RuntimeError as err:
            raise ValueError(f"cannot read dosages from {str(self.path)!r}: {err}") from err
        buf[buf == PGEN_MISSING] = np.nan
        return buf.T

    def close(self) -> None:
        pg = getattr(self, "_pgen", None)
        if pg is not None:
            pg.close()
            self._pgen = None
