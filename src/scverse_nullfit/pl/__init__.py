"""Plots of null-model fits and association results."""

__all__: list[str] = []
