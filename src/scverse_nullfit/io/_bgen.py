"""Genotype dosages from BGEN files (v1.1 and v1.2 layouts, with a ``.sample`` file), through ``cbgen``."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ._geno_common import GenotypeFile, donor_index, missing_extra, variant_ids


def _cbgen():
    try:
        import cbgen
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise missing_extra("BGEN files", "cbgen", "bgen") from err
    return cbgen


def read_sample_file(path: Path, id_column: str | None = None) -> pd.DataFrame:
    """An Oxford ``.sample`` file (header line, types line, one line per sample), indexed by donor ID.

    The donor ID is ``id_column`` (default ``ID_2`` when present, as PLINK 2 and the UK Biobank write it, else the
    first column).
    """
    try:
        table = pd.read_csv(path, sep=r"\s+", header=0, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read the sample file {str(path)!r}: {err}") from err
    if len(table) and table.iloc[0].astype(str).str.fullmatch(r"0|D|C|P|B|\d").all():
        table = table.iloc[1:]  # the types line ("0 0 0 D ...")
    if id_column is None:
        id_column = "ID_2" if "ID_2" in table.columns else table.columns[0]
    if id_column not in table.columns:
        raise KeyError(f"{id_column!r} is not a column of the sample file {str(path)!r} ({list(table.columns)}).")
    table = table.copy()
    table.index = donor_index(table[id_column].to_numpy(), path)
    return table


def _check_header(path: Path) -> tuple[int, int]:
    """The BGEN magic number and a layout / compression that cbgen reads, else a ValueError naming the file."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[16:20] not in (b"bgen", b"\0\0\0\0"):
        raise ValueError(f"{str(path)!r} is not a BGEN file (no 'bgen' magic number in its header).")
    length = struct.unpack("<I", head[4:8])[0]
    with open(path, "rb") as fh:
        fh.seek(4 + length - 4)
        flags = struct.unpack("<I", fh.read(4))[0]
    compression, layout = flags & 3, (flags >> 2) & 15
    if layout not in (1, 2):
        raise ValueError(f"BGEN file {str(path)!r} has layout {layout}; only layouts 1 and 2 (BGEN v1.1, v1.2) exist.")
    return compression, layout


class BgenGenotypes(GenotypeFile):
    """Dosages from a BGEN file (layouts 1 and 2, i.e. BGEN v1.1 and v1.2), read one variant at a time.

    Needs the optional package ``cbgen`` (``pip install 'scverse-nullfit[bgen]'``). Opening the file writes
    cbgen's small index of the variants (offsets and metadata) to a temporary directory, removed on
    :meth:`close` (or use a ``.metafile`` already beside the file).

    The first allele of each variant is ``ref``, the second ``alt``; the dosage is the expected count of the
    ``alt`` allele from the genotype probabilities (``P(het) + 2 P(hom alt)`` for unphased diploid calls,
    the sum of the haplotypes' ``alt`` probabilities for phased ones; haploid calls give 0..1). Files written
    with the reference allele second (e.g. ``plink2 --export bgen-1.2`` without ``ref-first``) need
    ``ref_first=False``. Missing genotypes are NaN. Multi-allelic variants are skipped (not in ``var``).
    Layout-2 blocks of diploid biallelic samples with 8, 16 or 32 bits per probability (what tools write) are
    decoded here with numpy; other blocks (layout 1, zstd, other bit depths, other ploidies) by cbgen.
    Variants are named by their rsid (else their variant ID, else ``chrom:pos:ref:alt``).

    Parameters
    ----------
    path
        The ``.bgen`` file.
    sample_path
        The ``.sample`` file (default: the file's name with ``.sample`` instead of ``.bgen``, if it exists, else
        the sample IDs stored in the BGEN file).
    sample_id_column
        Column of the sample file with the donor IDs (default ``ID_2``, else the first column).
    ref_first
        The first allele is the reference (``True``, the BGEN convention); ``False`` counts the first allele.
    samples
        Only these samples (those of the file among them, in file order).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        sample_path: str | os.PathLike | None = None,
        sample_id_column: str | None = None,
        ref_first: bool = True,
        samples: Iterable[str] | None = None,
    ):
        cbgen = _cbgen()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"BGEN file {os.fspath(path)!r} not found.")
        self._compression, self._layout = _check_header(self.path)
        try:
            self._bgen = cbgen.bgen_file(self.path)
        except RuntimeError as err:
            raise ValueError(f"cannot read {str(self.path)!r} as a BGEN file: {err}") from err
        n = self._bgen.nsamples
        if sample_path is None:
            guess = self.path.with_suffix(".sample")
            sample_path = guess if guess.is_file() else None
        if sample_path is not None:
            self.sample_path = Path(sample_path)
            if not self.sample_path.is_file():
                raise FileNotFoundError(f"sample file {os.fspath(sample_path)!r} not found.")
            self.obs = read_sample_file(self.sample_path, sample_id_column)
            if len(self.obs) != n:
                raise ValueError(
                    f"sample file {str(self.sample_path)!r} lists {len(self.obs)} samples but {str(self.path)!r} "
                    f"holds {n}."
                )
        elif self._bgen.contain_samples:
            self.sample_path = None
            ids = np.char.decode(self._bgen.read_samples().astype(bytes), "utf-8")
            self.obs = pd.DataFrame(index=donor_index(ids, self.path))
        else:
            raise FileNotFoundError(
                f"BGEN file {str(self.path)!r} stores no sample IDs and has no .sample file beside it; pass "
                "sample_path."
            )
        self._keep = None  # rows of the file's samples kept by ``samples``
        if samples is not None:
            keep = np.flatnonzero(self.obs.index.isin(np.asarray(list(samples)).astype(str)))
            if 0 < len(keep) < len(self.obs):  # none kept: keep all (for messages)
                self._keep = keep
                self.obs = self.obs.iloc[keep]
        self._ref_first = bool(ref_first)
        self._tmp = None
        self._fh = open(self.path, "rb")  # closed in close()
        self._scan(cbgen)

    def _scan(self, cbgen) -> None:
        beside = Path(f"{self.path}.metafile")
        if beside.is_file() and beside.stat().st_mtime >= self.path.stat().st_mtime:
            mf_path = beside
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="snf-bgen-")
            mf_path = Path(self._tmp.name) / "variants.metafile"
            try:
                self._bgen.create_metafile(mf_path)
            except RuntimeError as err:
                raise ValueError(f"cannot index the variants of {str(self.path)!r}: {err}") from err
        parts = []
        with cbgen.bgen_metafile(mf_path) as mf:
            for i in range(mf.npartitions):
                parts.append(mf.read_partition(i).variants)

        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return np.concatenate(arrays) if arrays else np.zeros(0)

        def text(name):
            return np.char.decode(cat(name).astype(bytes), "utf-8").astype(object)

        nalleles = cat("nalleles").astype(np.int64)
        keep = np.flatnonzero(nalleles == 2)
        alleles = text("allele_ids")[keep]
        split = [a.split(",") for a in alleles]
        first = np.array([s[0] for s in split], dtype=object)
        second = np.array([s[1] if len(s) > 1 else "" for s in split], dtype=object)
        ref, alt = (first, second) if self._ref_first else (second, first)
        chrom = text("chromosome")[keep]
        pos = cat("position").astype(np.int64)[keep]
        rsid, varid = text("rsid")[keep], text("id")[keep]
        name = np.where(np.isin(rsid.astype(str), ["", "."]), varid, rsid)
        self._offsets = cat("offset").astype(np.uint64)[keep]
        self.var = pd.DataFrame(
            {"chrom": chrom.astype(str), "pos": pos, "ref": ref.astype(str), "alt": alt.astype(str),
             "rsid": rsid.astype(str), "varid": varid.astype(str)},
            index=variant_ids(name, chrom, pos, ref, alt),
        )  # fmt: skip

    def _dosage(self, offset: int) -> np.ndarray:
        """Dosages of the variant whose genotype block starts at ``offset``."""
        if self._layout == 2 and self._compression in (0, 1):
            d = self._dosage_layout2(offset)
            if d is not None:
                return d
            if self._compression == 0:
                raise ValueError(
                    f"BGEN file {str(self.path)!r} has an uncompressed layout-2 block that is not diploid biallelic "
                    "with 8, 16 or 32 bits, which cbgen cannot read; recompress it (e.g. 'plink2 --bgen FILE "
                    "ref-first --export bgen-1.2')."
                )
        return self._dosage_cbgen(offset)

    def _dosage_layout2(self, offset: int) -> np.ndarray | None:
        """The common case decoded with numpy (much faster than cbgen's bit-by-bit loop): a layout-2 block,
        uncompressed or zlib, of diploid biallelic samples with 8, 16 or 32 bits per probability; None otherwise.

        The block holds ``N``, ``K``, the ploidy range, one ploidy/missingness byte per sample, the phased flag,
        the bit depth ``B`` and then two ``B``-bit integers per sample (``P(11)``, ``P(12)`` unphased; ``P(allele 1)``
        of each haplotype phased) over ``2^B - 1``.
        """
        fh = self._fh
        fh.seek(offset)
        (size,) = struct.unpack("<I", fh.read(4))
        if self._compression == 1:
            (full,) = struct.unpack("<I", fh.read(4))
            data = zlib.decompress(fh.read(size - 4))
            if len(data) != full:
                raise ValueError(f"corrupt genotype block at byte {offset} of {str(self.path)!r}.")
        else:
            data = fh.read(size)
        n, k, pmin, pmax = struct.unpack_from("<IHBB", data, 0)
        if n != self._bgen.nsamples or k != 2 or pmin != 2 or pmax != 2:
            return None
        ploidy = np.frombuffer(data, dtype=np.uint8, count=n, offset=8)
        phased, bits = data[8 + n], data[9 + n]
        dtype = {8: "<u1", 16: "<u2", 32: "<u4"}.get(bits)
        if dtype is None:
            return None
        q = np.frombuffer(data, dtype=dtype, count=2 * n, offset=10 + n).reshape(n, 2).astype(np.float64)
        top = float((1 << bits) - 1)
        if phased:
            d2 = (2 * top - q[:, 0] - q[:, 1]) / top
        else:
            d2 = (q[:, 1] + 2 * (top - q[:, 0] - q[:, 1])) / top
        d = d2 if self._ref_first else 2.0 - d2
        d = np.where(ploidy & 0x80, np.nan, d)
        return d if self._keep is None else d[self._keep]

    def _dosage_cbgen(self, offset: int) -> np.ndarray:
        g = self._bgen.read_genotype(int(offset))
        p = np.asarray(g.probability, dtype=np.float64)
        ploidy = np.asarray(g.ploidy, dtype=np.int64)
        if g.phased:
            # haplotype h's probabilities of (allele 1, allele 2) are columns 2h, 2h+1
            d2 = np.nansum(p[:, 1::2], axis=1)
        else:
            # columns are genotypes with 0, 1, ..., ploidy copies of allele 2
            d2 = np.nansum(p * np.arange(p.shape[1])[None, :], axis=1)
        d = d2 if self._ref_first else ploidy - d2
        d = np.where(np.asarray(g.missing, dtype=bool), np.nan, d)
        return d if self._keep is None else d[self._keep]

    def _read(self, cols: np.ndarray) -> np.ndarray:
        out = np.empty((self.shape[0], len(cols)))
        try:
            for j, c in enumerate(cols):
                out[:, j] = self._dosage(self._offsets[c])
        except (RuntimeError, OSError, zlib.error, struct.error) as err:
            raise ValueError(f"cannot read dosages from {str(self.path)!r}: {err}") from err
        return out

    def close(self) -> None:
        bg = getattr(self, "_bgen", None)
        if bg is not None:
            bg.close()
            self._bgen = None
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None
