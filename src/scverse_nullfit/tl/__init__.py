"""Tools: fit null models and test variants."""

from ._fit_null import fit_null

__all__ = ["fit_null"]
