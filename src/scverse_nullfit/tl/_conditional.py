"""Conditioning variants of a conditional score test, from variant IDs or a DataFrame, checked once."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scanpy import logging as logg

from .._core._conditional import condition as _condition
from .._core._conditional import redundant
from .._core._step2 import CompactNull, CountNull, impute
from .._utils import preview
from ..io._genotypes import GenotypeMatrix


def conditioning_dosages(condition, geno: GenotypeMatrix, rows: np.ndarray, donors: pd.Index) -> pd.DataFrame:
    """The conditioning variants' dosages (model donors x k, NaN where missing) from variant IDs of ``geno`` or a
    DataFrame indexed by donor ID; unknown, duplicated or non-numeric conditioning variants are errors."""
    if isinstance(condition, pd.DataFrame):
        cg = GenotypeMatrix(condition)
        crow = cg.donors.get_indexer(donors)
        if (crow < 0).any():
            raise ValueError(f"donors of the null-model fit are missing from condition: {preview(donors[crow < 0])}.")
        return pd.DataFrame(cg.read(crow, np.arange(cg.n_variants)), index=donors, columns=cg.var.index)
    if isinstance(condition, str):
        condition = [condition]
    try:
        ids = pd.Index([str(c) for c in condition])
    except TypeError:
        raise ValueError(
            "condition must be variant IDs or a DataFrame of dosages (donors x variants), "
            f"not {type(condition).__name__}."
        ) from None
    if ids.has_duplicates:
        raise ValueError(f"condition names variants more than once: {preview(ids[ids.duplicated()].unique())}.")
    idx = geno.var.index.get_indexer(ids)
    if (idx < 0).any():
        raise KeyError(f"conditioning variants not in the genotypes: {preview(ids[idx < 0])}.")
    return pd.DataFrame(geno.read(rows, idx), index=donors, columns=ids)


def conditional_model(model: CompactNull | CountNull, dosages: pd.DataFrame) -> CompactNull | CountNull:
    """``model`` with the conditioning variants added as covariates (mean-imputed, rotated).

    Conditioning variants without an observed dosage, monomorphic among the fit's donors or collinear (with each
    other or the covariates) for every gene are errors naming them; genes for which they are collinear only
    numerically get NaN statistics, with a warning.
    """
    if dosages.shape[1] == 0:
        return model
    G, poly = impute(dosages.to_numpy(dtype=np.float64))
    if not poly.all():
        raise ValueError(
            "conditioning variants without any observed dosage or monomorphic among the fit's donors: "
            f"{preview(dosages.columns[~poly])}."
        )
    Ct = model.rotate(G)
    out, ok = _condition(model, Ct)
    if model.n_genes and not ok.any():
        bad = dosages.columns[redundant(model, Ct)]
        raise ValueError(
            "conditioning variants are collinear with the covariates or with the conditioning variants before them "
            f"(e.g. in perfect linkage disequilibrium): {preview(bad)}; drop them from condition."
        )
    if not ok.all():
        logg.warning(
            f"the conditioning variants are numerically collinear for {int((~ok).sum())} genes, whose conditional "
            "statistics are NaN."
        )
    return out
