"""GRM readers and writers. Every reader returns a square DataFrame indexed and columned by donor ID.

Supported formats (chosen by :func:`read_grm` from the file's suffix):

- GCTA binary: ``PREFIX.grm.bin`` (float32 lower triangle, row by row) with ``PREFIX.grm.id`` (``FID IID``);
  ``PREFIX.grm.N.bin`` (SNP counts) may sit beside them and is not needed.
- GCTA text: ``PREFIX.grm.gz`` (lines ``i j nsnp value``, 1-based indices, lower triangle) with ``PREFIX.grm.id``.
- PLINK ``--make-rel``: ``PREFIX.rel`` / ``PREFIX.rel.gz`` (text) or ``PREFIX.rel.bin`` (float64, or float32 from
  PLINK 2's ``bin4``), square, ``square0`` or triangle shape, with ``PREFIX.rel.id`` (PLINK 2 writes a header line
  ``#FID IID`` or ``#IID``; PLINK 1.9 writes ``FID IID`` without header).
- SAIGE sparse GRM: Matrix Market ``.mtx`` with its sample IDs in ``.mtx.sampleIDs.txt`` (or ``.sampleIDs.txt``).
- A square table (``.tsv``, ``.csv``, ``.txt``, optionally gzipped) with donor IDs as header and first column.
- PLINK genotypes (``.bed`` with ``.bim``/``.fam``): a GRM is computed by :func:`~scverse_nullfit.io.grm_from_plink`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd


def _strip(path: Path | str, suffixes: tuple[str, ...]) -> str:
    name = str(path)
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _require(path: Path | str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} not found.")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file.")
    return path


def _check_unique(ids: list[str], path: Path) -> None:
    index = pd.Index(ids)
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"{str(path)!r} lists duplicated sample IDs: {dup}.")


def _read_id_file(path: Path | str, *, what: str = "GRM ID file", two_columns: bool = True) -> list[str]:
    """Sample IDs of a GCTA/PLINK ID file: the IID column.

    A first line starting with ``#`` is a header (PLINK 2: ``#FID IID ...`` or ``#IID ...``) naming the columns;
    without header the IID is the second column (``FID IID``), or the only one when ``two_columns`` is false and a
    line has a single field.
    """
    path = _require(path, what)
    ids: list[str] = []
    iid_col = None
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if lineno == 1 and fields[0].startswith("#"):
                names = [fields[0][1:], *fields[1:]]
                if "IID" not in names:
                    raise ValueError(f"{str(path)!r}: header line {line.strip()!r} has no IID column.")
                iid_col = names.index("IID")
                continue
            if iid_col is not None:
                if len(fields) <= iid_col:
                    raise ValueError(f"{str(path)!r} line {lineno}: expected at least {iid_col + 1} fields.")
                ids.append(fields[iid_col])
            elif len(fields) >= 2:
                ids.append(fields[1])
            elif not two_columns:
                ids.append(fields[0])
            else:
                raise ValueError(f"{str(path)!r} line {lineno}: expected 'FID IID', found {line.strip()!r}.")
    _check_unique(ids, path)
    return ids


def _frame(G: np.ndarray, ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(G, index=pd.Index(ids, name="donor"), columns=pd.Index(ids, name="donor"))


def _from_lower(tri: np.ndarray, n: int) -> np.ndarray:
    """The symmetric matrix whose lower triangle, read row by row, is ``tri``."""
    G = np.zeros((n, n))
    rows, cols = np.tril_indices(n)
    G[rows, cols] = tri
    G[cols, rows] = tri
    return G


def _symmetrise_half(G: np.ndarray) -> np.ndarray:
    """Mirror a matrix stored as one triangle with zeros in the other (PLINK ``square0``); leave others alone."""
    upper = np.triu(G, 1)
    lower = np.tril(G, -1)
    if not upper.any() and lower.any():
        return G + lower.T
    if not lower.any() and upper.any():
        return G + upper.T
    return G


# --------------------------------------------------------------------------------------------------- GCTA binary


def read_gcta_grm(prefix: str | os.PathLike) -> pd.DataFrame:
    """Read a GCTA binary GRM (``PREFIX.grm.bin`` with ``PREFIX.grm.id``).

    Parameters
    ----------
    prefix
        The file prefix, or the path of the ``.grm.bin`` (or ``.grm.id``, ``.grm.N.bin``) file itself.

    Returns
    -------
    A symmetric DataFrame indexed and columned by the IIDs of the ``.grm.id`` file.
    """
    stem = _strip(Path(prefix), (".grm.N.bin", ".grm.bin", ".grm.id", ".grm"))
    bin_path, id_path = Path(stem + ".grm.bin"), Path(stem + ".grm.id")
    _require(bin_path, "GCTA GRM file")
    ids = _read_id_file(id_path)
    n = len(ids)
    expected = n * (n + 1) // 2 * 4
    size = bin_path.stat().st_size
    if size != expected:
        raise ValueError(
            f"{str(bin_path)!r} has {size} bytes but {str(id_path)!r} lists {n} samples, which needs {expected} bytes "
            "(float32 lower triangle)."
        )
    tri = np.fromfile(bin_path, dtype="<f4").astype(np.float64)
    return _frame(_from_lower(tri, n), ids)


def write_grm(
    grm: pd.DataFrame,
    prefix: str | os.PathLike,
    *,
    fid: pd.Series | None = None,
    n_snps: float | np.ndarray | None = None,
) -> None:
    """Write a GRM as GCTA binary files ``PREFIX.grm.bin`` and ``PREFIX.grm.id``.

    Values are stored as float32, as GCTA does (a relative precision of about 6e-8).

    Parameters
    ----------
    grm
        Square symmetric DataFrame indexed and columned by donor ID.
    prefix
        Output prefix (a trailing ``.grm.bin`` or ``.grm`` is removed).
    fid
        Family IDs by donor; the donor ID is used when omitted.
    n_snps
        If given, also write ``PREFIX.grm.N.bin``: the number of SNPs behind each entry (a scalar, or a donors x
        donors matrix).
    """
    G = _validated_square(grm, "grm")
    stem = _strip(Path(prefix), (".grm.N.bin", ".grm.bin", ".grm.id", ".grm"))
    ids = [str(i) for i in grm.index]
    if [str(c) for c in grm.columns] != ids:
        raise ValueError("grm must have the same donor IDs, in the same order, as index and columns.")
    if any(not i or any(ch.isspace() for ch in i) for i in ids):
        raise ValueError("donor IDs written to a .grm.id file must be non-empty and contain no whitespace.")
    if fid is not None:
        missing = pd.Index(ids).difference(fid.index.astype(str))
        if len(missing):
            raise KeyError(f"fid has no family ID for donors {missing[:5].tolist()}.")
        fid = fid.set_axis(fid.index.astype(str))
    rows, cols = np.tril_indices(len(ids))
    G[rows, cols].astype("<f4").tofile(stem + ".grm.bin")
    if n_snps is not None:
        N = np.broadcast_to(np.asarray(n_snps, dtype=np.float64), G.shape)
        N[rows, cols].astype("<f4").tofile(stem + ".grm.N.bin")
    fids = ids if fid is None else [str(fid.loc[i]) for i in ids]
    with open(stem + ".grm.id", "w") as fh:
        for f, i in zip(fids, ids, strict=True):
            fh.write(f"{f}\t{i}\n")


def _validated_square(grm: pd.DataFrame, name: str) -> np.ndarray:
    if not isinstance(grm, pd.DataFrame):
        raise ValueError(f"{name} must be a DataFrame indexed and columned by donor ID, not {type(grm).__name__}.")
    G = np.array(grm, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{name} must be square, but has shape {G.shape}.")
    return G


# ----------------------------------------------------------------------------------------------------- GCTA text


def read_gcta_grm_gz(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GCTA text GRM (``PREFIX.grm.gz`` with ``PREFIX.grm.id``), as written by ``gcta --make-grm-gz``.

    Each line is ``i j nsnp value`` with 1-based sample indices into the ``.grm.id`` file; every pair of the lower
    triangle (diagonal included) must appear once (a pair given as ``j i`` counts as ``i j``).

    Parameters
    ----------
    path
        The ``.grm.gz`` file, or its prefix.

    Returns
    -------
    A symmetric DataFrame indexed and columned by the IIDs of the ``.grm.id`` file.
    """
    stem = _strip(Path(path), (".grm.gz", ".grm.id", ".grm"))
    gz_path, id_path = Path(stem + ".grm.gz"), Path(stem + ".grm.id")
    _require(gz_path, "GCTA text GRM file")
    ids = _read_id_file(id_path)
    n = len(ids)
    try:
        table = pd.read_csv(
            gz_path,
            sep=r"\s+",
            header=None,
            compression="infer",
            comment="#",
            dtype=np.float64,
            float_precision="round_trip",
        )
    except (pd.errors.ParserError, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{str(gz_path)!r} is not a GCTA text GRM ('i j nsnp value' lines): {err}") from err
    if table.shape[1] != 4:
        raise ValueError(f"{str(gz_path)!r}: expected 4 columns 'i j nsnp value', found {table.shape[1]}.")
    ij = table.iloc[:, :2].to_numpy()
    if not np.isfinite(ij).all() or (ij != np.round(ij)).any():
        raise ValueError(f"{str(gz_path)!r}: the first two columns must be integer sample indices.")
    i = ij[:, 0].astype(np.int64) - 1
    j = ij[:, 1].astype(np.int64) - 1
    bad = (i < 0) | (j < 0) | (i >= n) | (j >= n)
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 1
        raise ValueError(
            f"{str(gz_path)!r} line {line}: index out of range 1..{n} ({str(id_path)!r} lists {n} samples)."
        )
    hi, lo = np.maximum(i, j), np.minimum(i, j)
    flat = hi * (hi + 1) // 2 + lo
    expected = n * (n + 1) // 2
    counts = np.bincount(flat, minlength=expected)
    if (counts > 1).any():
        k = int(np.flatnonzero(counts > 1)[0])
        r = int((np.sqrt(8 * k + 1) - 1) // 2)
        raise ValueError(f"{str(gz_path)!r} lists the pair ({r + 1}, {k - r * (r + 1) // 2 + 1}) more than once.")
    if len(flat) != expected:
        raise ValueError(
            f"{str(gz_path)!r} has {len(flat)} entries but {str(id_path)!r} lists {n} samples, which needs {expected} "
            "(lower triangle with diagonal)."
        )
    G = np.zeros((n, n))
    values = table.iloc[:, 3].to_numpy(dtype=np.float64)
    G[hi, lo] = values
    G[lo, hi] = values
    return _frame(G, ids)


# ----------------------------------------------------------------------------------------------------- PLINK rel


def _rel_paths(path: Path) -> tuple[Path, Path]:
    name = str(path)
    if name.endswith(".rel.id"):
        stem = name[: -len(".rel.id")]
        for suffix in (".rel.bin", ".rel", ".rel.gz"):
            if Path(stem + suffix).exists():
                return Path(stem + suffix), Path(name)
        raise FileNotFoundError(f"no PLINK relationship matrix (.rel.bin, .rel, .rel.gz) beside {name!r}.")
    stem = _strip(path, (".rel.bin", ".rel.gz", ".rel"))
    return path, Path(stem + ".rel.id")


def read_plink_rel(path: str | os.PathLike) -> pd.DataFrame:
    """Read a PLINK ``--make-rel`` relationship matrix with its ``.rel.id`` file.

    Parameters
    ----------
    path
        ``PREFIX.rel`` or ``PREFIX.rel.gz`` (text: one row per line, square, ``square0`` or lower triangle) or
        ``PREFIX.rel.bin`` (binary float64, or float32 from PLINK 2's ``bin4``; square or lower triangle, read
        from the file size). ``PREFIX.rel.id`` lists the samples (with PLINK 2's ``#FID IID`` / ``#IID`` header,
        or PLINK 1.9's header-less ``FID IID`` lines).

    Returns
    -------
    A symmetric DataFrame indexed and columned by IID.
    """
    mat_path, id_path = _rel_paths(Path(path))
    _require(mat_path, "PLINK relationship matrix")
    ids = _read_id_file(id_path, what="PLINK .rel.id file", two_columns=False)
    n = len(ids)
    if str(mat_path).endswith(".rel.bin"):
        G = _read_rel_bin(mat_path, n, id_path)
    else:
        G = _read_rel_text(mat_path, n, id_path)
    return _frame(_symmetrise_half(G), ids)


def _read_rel_bin(path: Path, n: int, id_path: Path) -> np.ndarray:
    size = path.stat().st_size
    n_tri = n * (n + 1) // 2
    shapes = {n * n * 8: ("<f8", "square"), n_tri * 8: ("<f8", "triangle"), n * n * 4: ("<f4", "square")}
    shapes.setdefault(n_tri * 4, ("<f4", "triangle"))
    if size not in shapes:
        raise ValueError(
            f"{str(path)!r} has {size} bytes, which fits no PLINK .rel.bin shape for the {n} samples of "
            f"{str(id_path)!r} (square: {n * n * 8} bytes, triangle: {n_tri * 8} bytes as float64, or half as float32)."
        )
    dtype, shape = shapes[size]
    values = np.fromfile(path, dtype=dtype).astype(np.float64)
    if shape == "square":
        return values.reshape(n, n)
    return _from_lower(values, n)


def _read_rel_text(path: Path, n: int, id_path: Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt") as fh:
            for lineno, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(rows) >= n:
                    raise ValueError(f"{str(path)!r} has more than the {n} rows listed in {str(id_path)!r}.")
                try:
                    rows.append(np.array(fields, dtype=np.float64))
                except ValueError as err:
                    raise ValueError(f"{str(path)!r} line {lineno}: not a row of numbers ({err}).") from err
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"could not read {str(path)!r} as a PLINK text relationship matrix: {err}") from err
    if len(rows) != n:
        raise ValueError(f"{str(path)!r} has {len(rows)} rows but {str(id_path)!r} lists {n} samples.")
    lengths = np.array([len(r) for r in rows])
    if (lengths == n).all():
        return np.vstack(rows)
    if np.array_equal(lengths, np.arange(1, n + 1)):
        return _from_lower(np.concatenate(rows), n)
    bad = int(np.flatnonzero((lengths != n) & (lengths != np.arange(1, n + 1)))[0])
    raise ValueError(
        f"{str(path)!r} row {bad + 1} has {lengths[bad]} values; expected {n} (square) or {bad + 1} (triangle) for "
        f"the {n} samples of {str(id_path)!r}."
    )


# ------------------------------------------------------------------------------------------------- SAIGE sparse


def _saige_id_path(mtx_path: Path) -> Path:
    name = str(mtx_path)
    candidates = [Path(name + ".sampleIDs.txt"), Path(_strip(name, (".mtx.gz", ".mtx")) + ".sampleIDs.txt")]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"sample ID file of the sparse GRM {name!r} not found (looked for {[str(c) for c in candidates]})."
    )


def read_saige_sparse_grm(path: str | os.PathLike, sample_ids: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read a SAIGE sparse GRM (``createSparseGRM.R`` output) into a dense DataFrame.

    Parameters
    ----------
    path
        The Matrix Market ``.mtx`` file (``symmetric``, or ``general`` holding one or both triangles), or its
        ``.sampleIDs.txt`` file.
    sample_ids
        The file of sample IDs, one per line in matrix order; by default ``PATH.sampleIDs.txt``, or the ``.mtx``
        path with ``.mtx`` replaced by ``.sampleIDs.txt``.

    Returns
    -------
    A symmetric DataFrame indexed and columned by sample ID; pairs absent from the file are 0.
    """
    from scipy import io as spio
    from scipy import sparse

    path = Path(path)
    if str(path).endswith(".sampleIDs.txt"):
        sample_ids = path if sample_ids is None else sample_ids
        path = Path(_strip(path, (".sampleIDs.txt",)))
        if not str(path).endswith((".mtx", ".mtx.gz")):
            path = Path(str(path) + ".mtx")
    _require(path, "sparse GRM file")
    id_path = Path(sample_ids) if sample_ids is not None else _saige_id_path(path)
    _require(id_path, "sparse GRM sample ID file")
    try:
        M = spio.mmread(str(path))
    except (ValueError, OSError, EOFError, IndexError) as err:
        raise ValueError(f"could not read {str(path)!r} as a Matrix Market file: {err}") from err
    if not sparse.issparse(M):
        M = sparse.coo_matrix(np.asarray(M))
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"{str(path)!r} holds a {M.shape[0]} x {M.shape[1]} matrix; a GRM must be square.")
    n = M.shape[0]
    with open(id_path) as fh:
        ids = [line.split()[0] for line in fh if line.strip()]
    if len(ids) == n + 1:  # a header line
        ids = ids[1:]
    if len(ids) != n:
        raise ValueError(f"{str(path)!r} is a {n} x {n} matrix but {str(id_path)!r} lists {len(ids)} sample IDs.")
    _check_unique(ids, id_path)
    G = _symmetrise_half(np.asarray(M.todense(), dtype=np.float64))  # donors x donors: dense is the target anyway
    return _frame(G, ids)


# ------------------------------------------------------------------------------------------------- square table


_TABLE_SUFFIXES = (".tsv", ".csv", ".txt", ".tsv.gz", ".csv.gz", ".txt.gz")


def read_grm_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a square GRM table with donor IDs as header and as first column.

    Parameters
    ----------
    path
        A ``.csv`` (comma-separated), ``.tsv`` (tab-separated) or ``.txt`` (whitespace-separated) file, optionally
        gzipped. The header lists the donor IDs, optionally after a label for the ID column; the first column of
        every row is the donor ID. Rows and columns may be in different orders (columns are reordered).

    Returns
    -------
    A DataFrame indexed and columned by donor ID, in the row order of the file.
    """
    path = _require(path, "GRM table")
    name = str(path).lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t" if name.endswith(".tsv") else None
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            header_line = fh.readline().rstrip("\r\n")
            body = pd.read_csv(
                fh,
                sep=sep if sep else r"\s+",
                header=None,
                dtype={0: str},
                keep_default_na=False,
                float_precision="round_trip",
            )
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"could not read {str(path)!r} as a square GRM table: {err}") from err
    header = [h.strip().strip('"') for h in (header_line.split(sep) if sep else header_line.split())]
    n = body.shape[0]
    if body.shape[1] != n + 1:
        raise ValueError(
            f"{str(path)!r} has {n} rows of {body.shape[1] - 1} values after the ID; a GRM table must be square with "
            "donor IDs as first column."
        )
    if len(header) == n + 1:
        header = header[1:]
    if len(header) != n:
        raise ValueError(f"{str(path)!r}: the header lists {len(header)} donor IDs but the table has {n} rows.")
    rows = body.iloc[:, 0].astype(str).str.strip().str.strip('"').tolist()
    _check_unique(rows, path)
    _check_unique(header, path)
    if set(rows) != set(header):
        extra = sorted(set(header) ^ set(rows))[:5]
        raise ValueError(f"{str(path)!r}: the header's donor IDs differ from the first column's (e.g. {extra}).")
    try:
        values = body.iloc[:, 1:].apply(pd.to_numeric).to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(path)!r} has non-numeric GRM entries: {err}") from err
    order = pd.Index(header).get_indexer(rows)
    return _frame(values[:, order], rows)


# --------------------------------------------------------------------------------------------------- dispatcher


def _read_bed(path: Path) -> pd.DataFrame:
    from ._plink import grm_from_plink

    return grm_from_plink(path)


def _refuse_zst(path: Path) -> pd.DataFrame:
    raise ValueError(
        f"{str(path)!r} is zstd-compressed; decompress it first (`zstd -d {path.name}`) or rerun PLINK 2 without "
        "the 'zs' modifier."
    )


#: Suffix -> reader, longest suffixes first (the first match wins).
_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".grm.N.bin": read_gcta_grm,
    ".grm.bin": read_gcta_grm,
    ".grm.id": read_gcta_grm,
    ".grm.gz": read_gcta_grm_gz,
    ".rel.bin": read_plink_rel,
    ".rel.id": read_plink_rel,
    ".rel.gz": read_plink_rel,
    ".rel.zst": _refuse_zst,
    ".rel": read_plink_rel,
    ".sampleIDs.txt": read_saige_sparse_grm,
    ".mtx.gz": read_saige_sparse_grm,
    ".mtx": read_saige_sparse_grm,
    **dict.fromkeys(_TABLE_SUFFIXES, read_grm_table),
    ".bed": _read_bed,
    ".bim": _read_bed,
    ".fam": _read_bed,
}

#: What a bare prefix may stand for, in order of preference.
_PREFIX_SUFFIXES = (".grm.bin", ".grm.gz", ".rel.bin", ".rel", ".rel.gz", ".bed")


def read_grm(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GRM file, choosing the format by its suffix.

    ===================================  ==============================================================
    suffix                               format
    ===================================  ==============================================================
    ``.grm.bin`` (``.grm.id``)           GCTA binary, :func:`read_gcta_grm`
    ``.grm.gz``                          GCTA text, :func:`read_gcta_grm_gz`
    ``.rel``, ``.rel.gz``, ``.rel.bin``  PLINK ``--make-rel``, :func:`read_plink_rel`
    ``.mtx`` (``.sampleIDs.txt``)        SAIGE sparse GRM, :func:`read_saige_sparse_grm`
    ``.tsv``, ``.csv``, ``.txt``         square table, :func:`read_grm_table`
    ``.bed`` (``.bim``, ``.fam``)        PLINK genotypes, :func:`grm_from_plink` with its defaults
    ===================================  ==============================================================

    A path without these suffixes is taken as a prefix: ``PREFIX.grm.bin``, ``PREFIX.grm.gz``, ``PREFIX.rel.bin``,
    ``PREFIX.rel``, ``PREFIX.rel.gz`` or ``PREFIX.bed``, whichever exists first.

    Parameters
    ----------
    path
        A GRM file, or a prefix.

    Returns
    -------
    A square DataFrame indexed and columned by donor ID.
    """
    path = Path(path)
    name = str(path)
    for suffix, reader in _READERS.items():
        if name.endswith(suffix):
            return reader(path)
    lowered = name.lower()
    for suffix in _TABLE_SUFFIXES:
        if lowered.endswith(suffix):
            return read_grm_table(path)
    for suffix in _PREFIX_SUFFIXES:
        if Path(name + suffix).exists():
            return read_grm(name + suffix)
    if not path.exists():
        raise FileNotFoundError(
            f"GRM file {name!r} not found (nor a prefix with {', '.join(_PREFIX_SUFFIXES)} beside it)."
        )
    raise ValueError(
        f"GRM file {name!r}: unknown format; supported suffixes: {', '.join(s for s in _READERS if s != '.rel.zst')}."
    )
