"""Readers and writers for genetic relationship matrices (GRMs) and genotypes."""

from ._grm import read_gcta_grm, read_grm, write_grm

__all__ = ["read_gcta_grm", "read_grm", "write_grm"]
