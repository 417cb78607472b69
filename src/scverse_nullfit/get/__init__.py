"""Accessors: results as DataFrames."""

from ._results import nullfit_df

__all__ = ["nullfit_df"]
