"""Plots of null-model fits and association results."""

from ._genetics import expression_by_genotype, manhattan
from ._plots import cis_locus, h2_hist, lambda_gc, qq

__all__ = ["cis_locus", "expression_by_genotype", "h2_hist", "lambda_gc", "manhattan", "qq"]
