"""Small built-in example data."""

from ._simulate import example, simulate, standardised_grm

__all__ = ["example", "simulate", "standardised_grm"]
