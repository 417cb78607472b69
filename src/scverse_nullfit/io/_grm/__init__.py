"""GRM readers and writers, one module per format family; :func:`read_grm` dispatches by suffix (``_dispatch``)."""

from ._dispatch import grm_prefix_exists, read_grm
from ._from_plink import grm_from_plink
from ._gcta import read_gcta_grm, read_gcta_grm_gz, write_grm
from ._plink_rel import read_plink_rel
from ._saige import read_saige_sparse_grm
from ._table import read_grm_table

__all__ = [
    "grm_from_plink",
    "grm_prefix_exists",
    "read_gcta_grm",
    "read_gcta_grm_gz",
    "read_grm",
    "read_grm_table",
    "read_plink_rel",
    "read_saige_sparse_grm",
    "write_grm",
]
