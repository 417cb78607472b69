"""Plots of null-model fits and association results."""

from ._plots import cis_locus, h2_hist, lambda_gc, qq

__all__ = ["cis_locus", "h2_hist", "lambda_gc", "qq"]
