"""Genotype dosages from VCF/BCF files (plain, bgzipped or BCF; indexed for region reads), through ``cyvcf2``."""

from __future__ import annotations

import gzip
import os
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ._geno_common import GenotypeFile, chrom_key, donor_index, existing, missing_extra, variant_ids

#: Requested records at most this far apart (in records) are read in one pass of an indexed file.
RUN_GAP = 256

VCF_SUFFIXES = (".vcf", ".vcf.gz", ".vcf.bgz", ".bcf")


def _cyvcf2():
    try:
        import cyvcf2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise missing_extra("VCF/BCF files", "cyvcf2", "vcf") from err
    return cyvcf2


def index_hint(path: Path) -> str:
    if path.name.endswith(".vcf"):
        return (
            f"compress and index it: 'bgzip {path.name} && tabix -p vcf {path.name}.gz' "
            f"(or 'bcftools view -Oz -o {path.name}.gz {path.name} && bcftools index -t {path.name}.gz')"
        )
    if path.name.endswith(".bcf"):
        return f"index it: 'bcftools index {path.name}'"
    return f"index it: 'tabix -p vcf {path.name}' or 'bcftools index -t {path.name}'"


def parse_regions(regions) -> list[tuple[str, float, float]]:
    """Regions as ``(chrom, start, end)`` tuples (1-based, inclusive) from tuples or ``"chrom:start-end"`` strings."""
    if isinstance(regions, (str, tuple)):
        regions = [regions]
    out = []
    for r in regions:
        if isinstance(r, str):
            m = re.fullmatch(r"\s*([^:\s]+)(?::([\d,]+)?-?([\d,]+)?)?\s*", r)
            if not m:
                raise ValueError(f"region {r!r} is not 'chrom', 'chrom:start-end' or a (chrom, start, end) tuple.")
            chrom, a, b = m.groups()
            start = float(a.replace(",", "")) if a else 1.0
            end = float(b.replace(",", "")) if b else np.inf
        else:
            try:
                chrom, start, end = r
                start, end = float(start), float(end)
            except (TypeError, ValueError) as err:
                raise ValueError(f"region {r!r} is not 'chrom:start-end' or a (chrom, start, end) tuple.") from err
        if not end >= start:
            raise ValueError(f"region {r!r} ends before it starts.")
        out.append((str(chrom), max(1.0, start), end))
    return out


def merge_regions(regions: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Overlapping or touching regions of one chromosome merged (chromosomes compared without ``chr``)."""
    by: dict[str, list[tuple[str, float, float]]] = {}
    for c, s, e in regions:
        by.setdefault(chrom_key(c), []).append((c, s, e))
    out = []
    for items in by.values():
        items.sort(key=lambda t: t[1])
        cur = list(items[0])
        for c, s, e in items[1:]:
            if s <= cur[2] + 1:
                cur[2] = max(cur[2], e)
            else:
                out.append(tuple(cur))
                cur = [c, s, e]
        out.append(tuple(cur))
    return out  # type: ignore[return-value]


def _check_header_samples(path: Path) -> None:
    """Duplicated sample names in a text VCF's header (htslib rejects such a header without saying why)."""
    if path.name.endswith(".bcf"):
        return
    try:
        with gzip.open(path, "rt") if _is_gzip(path) else open(path) as fh:
            for line in fh:
                if line.startswith("#CHROM"):
                    donor_index(line.rstrip("\n").split("\t")[9:], path)
                    return
                if not line.startswith("##"):
                    return
    except (OSError, UnicodeDecodeError, EOFError):
        return


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class VcfGenotypes(GenotypeFile):
    """Dosages from a VCF or BCF file, read lazily in chunks of records.

    Needs the optional package ``cyvcf2`` (``pip install 'scverse-nullfit[vcf]'``).

    The variants' metadata is read once when the file is opened (one pass over the records, or over the
    ``regions`` only); dosages are read on demand, only for the requested variants (through the index, when the
    file has one, else front to back). Memory holds the metadata and the requested block, never the whole file.

    Dosages come from the ``DS`` FORMAT field (``field``); for records without it, and for samples whose ``DS``
    is missing, they are the count of ``alt`` alleles in the called genotype ``GT`` (haploid calls count 0 or
    1). ``DS`` values, which htslib holds as 32-bit floats, are rounded to 6 decimals. A missing value (``.``,
    a missing allele in ``GT``, or neither field) becomes NaN.

    Multi-allelic records (several ``ALT`` alleles) are split into one biallelic variant per ``ALT`` allele
    (``multiallelic="split"``, the default: the dosage of that allele, ``DS`` having one value per ``ALT``;
    their IDs are ``ID:ALT``) or skipped (``multiallelic="skip"``). Records without an ID (``.``) are named
    ``chrom:pos:ref:alt``; duplicated IDs get ``-1``, ``-2``, ... appended.

    Parameters
    ----------
    path
        A ``.vcf``, ``.vcf.gz`` (bgzipped) or ``.bcf`` file.
    regions
        Only the records starting within these regions: ``(chrom, start, end)`` tuples or ``"chrom:start-end"``
        strings (1-based, inclusive; ``chr`` prefixes ignored). Needs an index (``.tbi`` or ``.csi``) beside
        the file; only these parts of the file are read.
    samples
        Only these samples (those of the file among them, in file order): htslib then skips the others' fields,
        which makes reading a file with many more samples than donors much faster.
    field
        The FORMAT field holding the dosages (``"DS"``); ``None`` uses ``GT`` only.
    multiallelic
        ``"split"`` or ``"skip"`` multi-allelic records.

    Attributes
    ----------
    obs
        Indexed by the file's sample IDs (``donor``), or those kept by ``samples``.
    var
        Indexed by variant ID (``variant``): ``chrom`` (as in the file), ``pos`` (1-based), ``ref``, ``alt``
        (the counted allele), ``id`` (the file's ID column).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        regions: Iterable | str | None = None,
        samples: Iterable[str] | None = None,
        field: str | None = "DS",
        multiallelic: Literal["split", "skip"] = "split",
    ):
        if multiallelic not in ("split", "skip"):
            raise ValueError(f"multiallelic must be 'split' or 'skip', not {multiallelic!r}.")
        cyvcf2 = _cyvcf2()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"VCF/BCF file {os.fspath(path)!r} not found.")
        self.index_path = existing(self.path, ".tbi", ".csi")
        try:
            self._vcf = cyvcf2.VCF(os.fspath(self.path), lazy=True)
        except Exception as err:  # cyvcf2 raises a bare Exception for a bad header
            _check_header_samples(self.path)
            raise ValueError(f"cannot read {str(self.path)!r} as VCF/BCF: {err}") from err
        self._cyvcf2 = cyvcf2
        every = donor_index(self._vcf.samples, self.path)
        self._subset = None
        if samples is not None:
            wanted = set(np.asarray(list(samples)).astype(str))
            keep = [s for s in every if s in wanted]
            if 0 < len(keep) < len(every):  # htslib then skips the others' fields (none kept: keep all, for messages)
                self._subset = keep
                self._vcf.close()
                self._vcf = self._open()
        self.obs = pd.DataFrame(index=every if self._subset is None else donor_index(self._vcf.samples, self.path))
        self._field = field if field is not None and self._has_format(field) else None
        self._iter: Iterator | None = None
        self._cursor = 0

        if regions is not None:
            if self.index_path is None:
                hint = index_hint(self.path)
                raise ValueError(f"region reads of {str(self.path)!r} need an index (.tbi or .csi) beside it; {hint}.")
            contigs = {chrom_key(c): c for c in self._vcf.seqnames}
            blocks = [(contigs[chrom_key(c)], s, e) for c, s, e in merge_regions(parse_regions(regions))
                      if chrom_key(c) in contigs]  # fmt: skip
            # blocks in file order of the contigs, then by start
            order = {c: i for i, c in enumerate(self._vcf.seqnames)}
            self._blocks = sorted(blocks, key=lambda b: (order[b[0]], b[1]))
        else:
            self._blocks = None
        self._scan(multiallelic)

    @property
    def contigs(self) -> list[str]:
        """The file's contigs: from its index (or header), including those outside the regions read."""
        if self._vcf is not None:
            names = list(self._vcf.seqnames)
            if names:
                return names
        return super().contigs

    def _has_format(self, field: str) -> bool:
        for h in self._vcf.header_iter():
            if h.type == "FORMAT" and h.info().get("ID") == field:
                return True
        return False

    # ---- metadata --------------------------------------------------------------------------------------------

    def _open(self, *, samples: bool = True):
        """A new cyvcf2 handle (of the chosen samples); without samples, htslib skips the per-sample fields (a 10x
        faster metadata scan)."""
        kwargs = {"samples": []} if not samples else {} if self._subset is None else {"samples": self._subset}
        return self._cyvcf2.VCF(os.fspath(self.path), lazy=True, **kwargs)

    def _region_query(self, contig: str, start: float, end: float, handle=None):
        end_s = "" if not np.isfinite(end) else str(int(end))
        return (self._vcf if handle is None else handle)(f"{contig}:{int(start)}-{end_s}")

    def _all_records(self, *, samples: bool = True) -> Iterator[tuple[int, object]]:
        """(block, record) over the records of the file or of the regions, in order."""
        vcf = self._open(samples=samples)  # a fresh handle: a cyvcf2 VCF iterates its records once
        try:
            if self._blocks is None:
                for v in vcf:
                    yield 0, v
                return
            for b, (contig, start, end) in enumerate(self._blocks):
                for v in self._region_query(contig, start, end, vcf):
                    if v.POS >= start:  # skip records that only overlap the region (deletions starting before it)
                        yield b, v
        finally:
            vcf.close()

    def _scan(self, multiallelic: str) -> None:
        """The variants' metadata, in compact arrays (one int per record and variant, strings shared)."""
        contig_code: dict[str, int] = {}  # contig -> code, in order of appearance
        chrom, pos, rec, alt_i = array("q"), array("q"), array("q"), array("q")
        rec_block, rec_pos = array("q"), array("q")
        ids, names, ref, alt = [], [], [], []
        r = -1
        try:
            for r, (b, v) in enumerate(self._all_records(samples=False)):
                c = contig_code.setdefault(v.CHROM, len(contig_code))
                # a record's block: its region (with regions), else its contig
                rec_block.append(b if self._blocks is not None else c)
                p = v.POS
                rec_pos.append(p)
                alts = v.ALT
                if not alts or (len(alts) > 1 and multiallelic == "skip"):
                    continue
                vid, reference, split = v.ID or ".", v.REF, len(alts) > 1
                for k, a in enumerate(alts, start=1):
                    chrom.append(c)
                    pos.append(p)
                    ids.append(vid)
                    names.append(f"{vid}:{a}" if split and vid != "." else vid)
                    ref.append(reference)
                    alt.append(a)
                    rec.append(r)
                    alt_i.append(k)
        except (OSError, ValueError, RuntimeError, AssertionError) as err:
            raise ValueError(f"cannot read the records of {str(self.path)!r} (record {r + 2}): {err}") from err
        self._n_records = r + 1
        self._rec = np.frombuffer(rec, dtype=np.int64).copy()
        self._alt_i = np.frombuffer(alt_i, dtype=np.int64).astype(np.intp)
        self._rec_block = np.frombuffer(rec_block, dtype=np.int64).astype(np.intp)
        self._block_contig = [b[0] for b in self._blocks] if self._blocks is not None else list(contig_code)
        self._rec_pos = np.frombuffer(rec_pos, dtype=np.int64).copy()
        chrom_a = np.array([*contig_code, ""], dtype=object)[np.frombuffer(chrom, dtype=np.int64)]
        pos_a = np.frombuffer(pos, dtype=np.int64).copy()
        ref_a, alt_a = np.array(ref, dtype=object), np.array(alt, dtype=object)
        index = variant_ids(np.array(names, dtype=object), chrom_a, pos_a, ref_a, alt_a)
        self.var = pd.DataFrame(
            {"chrom": chrom_a, "pos": pos_a, "ref": ref_a, "alt": alt_a, "id": np.array(ids, dtype=object)},
            index=index,
        )

    # ---- dosages ---------------------------------------------------------------------------------------------

    def _records(self, wanted: np.ndarray) -> Iterator[tuple[int, object]]:
        """(record number, record) for the sorted unique record numbers ``wanted``."""
        if self.index_path is None or (self._blocks is None and len(wanted) > self._n_records // 2):
            yield from self._records_sequential(wanted)
            return
        # runs of nearby records on one contig / block, each read with one region query
        blocks = self._rec_block[wanted]
        split = (np.diff(wanted) > RUN_GAP) | (blocks[1:] != blocks[:-1])
        for run in np.split(wanted, np.flatnonzero(split) + 1):
            r0, r1 = int(run[0]), int(run[-1])
            contig = self._block_contig[self._rec_block[r0]]
            p0, p1 = self._rec_pos[r0], self._rec_pos[r1]
            # the first record at position p0: the query's records at or after p0 are numbered from it
            first = r0
            while first > 0 and self._rec_pos[first - 1] == p0 and self._rec_block[first - 1] == self._rec_block[r0]:
                first -= 1
            k, j = first, 0
            for v in self._region_query(contig, p0, p1):
                if v.POS < p0:
                    continue
                if k > r1:
                    break
                if k == run[j]:
                    yield k, v
                    j += 1
                k += 1
            if j < len(run):
                raise ValueError(
                    f"{str(self.path)!r} changed since it was opened, or its index is out of date "
                    f"(records missing at {contig}:{p0}-{p1}); {index_hint(self.path)}."
                )

    def _records_sequential(self, wanted: np.ndarray) -> Iterator[tuple[int, object]]:
        if self._iter is None or wanted[0] < self._cursor:
            self._iter = iter(self._all_records())
            self._cursor = 0
        j = 0
        while j < len(wanted):
            try:
                _, v = next(self._iter)
            except StopIteration:
                self._iter = None
                raise ValueError(f"{str(self.path)!r} changed since it was opened (fewer records).") from None
            k = self._cursor
            self._cursor += 1
            if k == wanted[j]:
                yield k, v
                j += 1

    def _dosages(self, v, n_alt: int) -> np.ndarray:
        """Dosages (samples x ALT alleles) of one record: DS where present, else from GT."""
        n = self.shape[0]
        D = None
        if self._field is not None:
            ds = v.format(self._field)
            if ds is not None and ds.ndim == 2 and ds.shape[1] == n_alt:
                # htslib stores DS as 32-bit floats: back to the decimals written (float32 keeps ~7 digits)
                D = np.round(np.asarray(ds, dtype=np.float64), 6)
                D[~np.isfinite(D)] = np.nan
        if D is None or np.isnan(D).any():
            gt = v.genotype
            G = np.full((n, n_alt), np.nan)
            if gt is not None:
                a = gt.array()[:, :-1]
                called = (a != -1).all(axis=1) & (a >= 0).any(axis=1)
                for k in range(n_alt):
                    G[:, k] = np.where(called, (a == k + 1).sum(axis=1), np.nan)
            D = G if D is None else np.where(np.isnan(D), G, D)
        return D

    def _read(self, cols: np.ndarray) -> np.ndarray:
        recs, alts = self._rec[cols], self._alt_i[cols]
        wanted, first = np.unique(recs, return_index=True)
        bounds = np.append(first, len(cols))
        out = np.empty((self.shape[0], len(cols)))
        try:
            for i, (_, v) in enumerate(self._records(wanted)):
                sl = slice(bounds[i], bounds[i + 1])
                D = self._dosages(v, len(v.ALT))
                out[:, sl] = D[:, alts[sl] - 1]
        except (OSError, RuntimeError, AssertionError) as err:
            raise ValueError(f"cannot read dosages from {str(self.path)!r}: {err}") from err
        return out

    def close(self) -> None:
        self._iter = None
        vcf = getattr(self, "_vcf", None)
        if vcf is not None:
            vcf.close()
            self._vcf = None
