"""Where the tools store their results: every ``adata`` key spelled in one place (a leaf module)."""

from __future__ import annotations


def _varm_key(suffix: str, what: str) -> staticmethod:
    """A ``Key`` method naming the ``varm`` entry ``f"{key}_{suffix}"``."""

    def name(key: str) -> str:
        return f"{key}_{suffix}"

    name.__name__ = name.__qualname__ = suffix
    name.__doc__ = f"``varm`` key of {what}."
    return staticmethod(name)


class Key:
    """Storage keys of :func:`~scverse_nullfit.tl.fit_null` and :func:`~scverse_nullfit.tl.cis_map`.

    ``fit_null(key_added=key)`` writes ``varm[key]`` (per-gene table), ``varm[Key.beta(key)]``,
    ``varm[Key.xhx_inv(key)]``, ``varm[Key.resid_rot(key)]`` and ``uns[key]`` (shared part, with
    :attr:`NULL_SHARED` and ``params``). ``cis_map(key_added=key)`` writes ``varm[key]`` (per-gene summary) and
    ``uns[key]`` with :attr:`CIS_VARIANTS` and ``params``.
    """

    #: Default key of a null-model fit.
    NULLFIT = "nullfit"
    #: Default key of a cis map.
    CIS = "cis"
    #: Entries of ``uns[key]`` that the step-2 tests need.
    NULL_SHARED = ("donors", "cells_per_donor", "eigenvalues", "eigenvectors", "covariates_rotated", "covariate_names")
    #: Entry of ``uns[key]`` holding the cis map's per-variant table.
    CIS_VARIANTS = "variants"
    #: Entry of ``uns[key]`` holding the independent signals of ``cis_map(independent=True)``.
    CIS_INDEPENDENT = "independent"
    #: Default key of a trans map.
    TRANS = "trans"
    #: Entry of ``uns[key]`` holding a trans map's associations below the threshold.
    TRANS_PAIRS = "associations"
    #: Entry of ``uns[key]`` holding a trans map's per-variant minimum p-values.
    TRANS_VARIANTS = "variants"
    #: Entry of ``uns[key]`` holding a call's parameters.
    PARAMS = "params"

    beta = _varm_key("beta", "fixed effects (genes x covariates)")
    xhx_inv = _varm_key("xhx_inv", "``(X'H^-1 X)^-1``: per gene its upper triangle, row by row (genes x p (p + 1) / 2)")
    resid_rot = _varm_key("resid_rot", "the rotated residual donor sums (genes x donors)")
    working_weights = _varm_key("working_weights", "a count fit's donor sums of the working weights (genes x donors)")
    working_xw = _varm_key("working_xw", "a count fit's ``T Z'WX``, row-major per gene (genes x donors p)")

    #: Entry of ``uns[key]`` holding a count fit's donor covariance blocks (``ptr``, ``donors``, ``L``, ``loff``).
    GRM_BLOCKS = "grm_blocks"
    #: Families of ``fit_null``: the Gaussian REML and the count GLMMs.
    COUNT_FAMILIES = ("poisson", "negative_binomial")

    @classmethod
    def null_varm(cls, key: str) -> tuple[str, ...]:
        """Every ``varm`` key a null-model fit under ``key`` writes (the last two only for count families)."""
        return key, cls.beta(key), cls.xhx_inv(key), cls.resid_rot(key), cls.working_weights(key), cls.working_xw(key)
