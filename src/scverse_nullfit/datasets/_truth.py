"""How a fit of the simulated example compares with the simulated truth (the ``demo`` command's report)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def truth_report(res: pd.DataFrame, true_h2: np.ndarray, eqtl_beta: np.ndarray | None = None) -> list[str]:
    """Lines comparing the fitted ``h2`` and ``h2_pval`` in ``res`` with the simulated ``true_h2``.

    A gene is null (no genetic donor effect at all) when its polygenic ``true_h2`` is 0 *and* it carries no
    simulated eQTL (``eqtl_beta`` 0): an eQTL is a genetic donor effect too, which the null model absorbs into
    its donor variance, so such genes count among the heritable ones.
    """
    h2 = res["h2"].to_numpy()
    pval = res["h2_pval"].to_numpy()
    corr = np.corrcoef(h2, true_h2)[0, 1] if np.std(h2) > 0 and np.std(true_h2) > 0 else np.nan
    has_eqtl = np.zeros(len(true_h2), bool) if eqtl_beta is None else np.asarray(eqtl_beta) != 0
    null = (true_h2 == 0) & ~has_eqtl
    lines = [
        "  compared with the simulated truth (var['true_h2']):",
        f"    correlation of h2 with true h2     {corr:.3f} over {len(h2)} genes",
        f"    mean h2                            {h2.mean():.3f} (true mean {true_h2.mean():.3f})",
    ]
    if null.any():
        lines.append(
            f"    null genes (no genetic effect)     {int(null.sum())}: {np.mean(pval[null] < 0.05):.1%} with "
            f"h2_pval < 0.05 (calibrated: about 5%), median h2_pval {np.median(pval[null]):.2f}"
        )
    if (~null).any():
        lines.append(
            f"    genes with a genetic effect        {int((~null).sum())}: {np.mean(pval[~null] < 0.05):.1%} with "
            f"h2_pval < 0.05 (power; {int(has_eqtl.sum())} of them through an eQTL)"
        )
    return lines
