"""Tools: fit null models and test variants."""

from ._cis_map import cis_map
from ._fit_null import fit_null
from ._grm import sparsify_grm
from ._score_test import score_test
from ._trans_map import trans_map

__all__ = ["cis_map", "fit_null", "score_test", "sparsify_grm", "trans_map"]
