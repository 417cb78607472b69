"""Readers and writers for genetic relationship matrices (GRMs) and genotypes."""

from ._bgen import BgenGenotypes
from ._formats import read_genotypes
from ._genotypes import open_genotypes
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
from ._pgen import PgenGenotypes
from ._plink import PlinkGenotypes, read_plink_genotypes
from ._tensorqtl import write_tensorqtl
from ._vcf import VcfGenotypes

__all__ = [
    "BgenGenotypes",
    "PgenGenotypes",
    "PlinkGenotypes",
    "VcfGenotypes",
    "grm_from_plink",
    "open_genotypes",
    "read_gcta_grm",
    "read_gcta_grm_gz",
    "read_genotypes",
    "read_grm",
    "read_grm_table",
    "read_plink_genotypes",
    "read_plink_rel",
    "read_saige_sparse_grm",
    "write_grm",
    "write_tensorqtl",
]
