"""Turning the tools' arguments into inputs: the GRM from a key, a DataFrame or a file (read through ``io``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..io._grm import grm_prefix_exists, read_grm

if TYPE_CHECKING:
    from anndata import AnnData


def resolve_grm(adata: AnnData, grm) -> tuple[pd.DataFrame, str]:
    """Turn the ``grm`` argument into a DataFrame indexed and columned by donor ID, and describe its source."""
    if isinstance(grm, pd.DataFrame):
        return grm, "DataFrame"
    if isinstance(grm, np.ndarray):
        raise ValueError(
            "grm is a bare numpy array; pass a DataFrame indexed and columned by donor ID so donors can be matched."
        )
    if isinstance(grm, str) and grm in adata.uns:
        value = adata.uns[grm]
        if not isinstance(value, pd.DataFrame):
            raise ValueError(
                f"adata.uns[{grm!r}] is a {type(value).__name__}, not a DataFrame indexed and columned by donor ID."
            )
        return value, f"adata.uns[{grm!r}]"
    if isinstance(grm, str | os.PathLike):
        path = Path(grm)
        if isinstance(grm, str) and os.sep not in grm and "." not in path.name and not grm_prefix_exists(path):
            raise KeyError(
                f"grm={grm!r} is neither a key of adata.uns (keys: {list(adata.uns.keys())}) nor an existing GRM file."
            )
        return read_grm(path), str(path)
    raise ValueError(f"grm must be a key of adata.uns, a DataFrame or a path, not {type(grm).__name__}.")


def grm_param(grm, checksum: str) -> str:
    """How the ``grm`` argument is recorded in ``params``: a key of ``uns`` or a path as given; a DataFrame by
    ``checksum``, its :func:`~scverse_nullfit._provenance.describe_frame` (also ``params["grm_checksum"]``)."""
    if isinstance(grm, pd.DataFrame):
        return checksum
    return os.fspath(grm) if isinstance(grm, os.PathLike) else str(grm)
