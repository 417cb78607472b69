"""Readers and writers for genetic relationship matrices (GRMs) and genotypes."""

from ._grm import (
    grm_from_plink,
    read_gcta_grm,
    read_gcta_grm_gz,
    read_grm,
    read_grm_table,
    read_plink_rel,
    read_saige_sparse_grm,
    write_grm,
)
from ._plink import read_plink_genotypes
from ._tensorqtl import write_tensorqtl

__all__ = [
    "grm_from_plink",
    "read_gcta_grm",
    "read_gcta_grm_gz",
    "read_grm",
    "read_grm_table",
    "read_plink_genotypes",
    "read_plink_rel",
    "read_saige_sparse_grm",
    "write_grm",
    "write_tensorqtl",
]
