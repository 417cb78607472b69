"""Where the tools store their results: every ``adata`` key spelled in one place (a leaf module)."""

from __future__ import annotations


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

    @staticmethod
    def beta(key: str) -> str:
        """``varm`` key of the fixed effects (genes x covariates)."""
        return f"{key}_beta"

    @staticmethod
    def xhx_inv(key: str) -> str:
        """``varm`` key of ``(X'H^-1 X)^-1``: per gene its upper triangle, row by row (genes x p (p + 1) / 2)."""
        return f"{key}_xhx_inv"

    @staticmethod
    def resid_rot(key: str) -> str:
        """``varm`` key of the rotated residual donor sums (genes x donors)."""
        return f"{key}_resid_rot"

    @staticmethod
    def working_weights(key: str) -> str:
        """``varm`` key of a count fit's donor sums of the working weights ``D_w`` (genes x donors)."""
        return f"{key}_working_weights"

    @staticmethod
    def working_xw(key: str) -> str:
        """``varm`` key of a count fit's ``T Z'WX`` (genes x donors x covariates)."""
        return f"{key}_working_xw"

    #: Entry of ``uns[key]`` holding a count fit's donor covariance blocks (``ptr``, ``donors``, ``L``, ``loff``).
    GRM_BLOCKS = "grm_blocks"
    #: Families of ``fit_null``: the Gaussian REML and the count GLMMs.
    COUNT_FAMILIES = ("poisson", "negative_binomial")

    @classmethod
    def null_varm(cls, key: str) -> tuple[str, ...]:
        """Every ``varm`` key a null-model fit under ``key`` writes (the last two only for count families)."""
        return key, cls.beta(key), cls.xhx_inv(key), cls.resid_rot(key), cls.working_weights(key), cls.working_xw(key)
