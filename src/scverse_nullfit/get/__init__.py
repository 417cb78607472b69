"""Accessors: results as DataFrames."""

from ._assoc import cis_df, cis_genes_df, cis_independent_df, trans_df
from ._results import nullfit_df

__all__ = ["cis_df", "cis_genes_df", "cis_independent_df", "nullfit_df", "trans_df"]
