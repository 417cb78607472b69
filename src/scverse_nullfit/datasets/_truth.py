"""How a fit of the simulated example compares with the simulated truth (the ``demo`` command's report)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def truth_report(res: pd.DataFrame, true_h2: np.ndarray) -> list[str]:
    """Lines comparing the fitted ``h2`` and ``h2_pval`` in ``res`` with the simulated ``true_h2``."""
    h2 = res["h2"].to_numpy()
    pval = res["h2_pval"].to_numpy()
    corr = np.corrcoef(h2, true_h2)[0, 1] if np.std(h2) > 0 and np.std(true_h2) > 0 else np.nan
    null = true_h2 == 0
    lines = [
        "  compared with the simulated truth (var['true_h2']):",
        f"    correlation of h2 with true h2     {corr:.3f} over {len(h2)} genes",
        f"    mean h2                            {h2.mean():.3f} (true mean {true_h2.mean():.3f})",
    ]
    if null.any():
        lines.append(
            f"    null genes (true h2 = 0)           {int(null.sum())}: {np.mean(pval[null] < 0.05):.1%} with "
            f"h2_pval < 0.05 (calibrated: about 5%), median h2_pval {np.median(pval[null]):.2f}"
        )
    if (~null).any():
        lines.append(
            f"    heritable genes (true h2 > 0)      {int((~null).sum())}: {np.mean(pval[~null] < 0.05):.1%} with "
            "h2_pval < 0.05 (power)"
        )
    return lines
