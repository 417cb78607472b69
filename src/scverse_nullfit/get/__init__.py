"""Accessors: results as DataFrames, and in the shapes other tools read (tensorQTL, coloc, SuSiE, mashr)."""

from ._assoc import cis_df, cis_genes_df, cis_independent_df, trans_df
from ._export import coloc_dataset, effect_matrices, ld, tensorqtl_df
from ._results import nullfit_df

__all__ = [
    "cis_df",
    "cis_genes_df",
    "cis_independent_df",
    "coloc_dataset",
    "effect_matrices",
    "ld",
    "nullfit_df",
    "tensorqtl_df",
    "trans_df",
]
