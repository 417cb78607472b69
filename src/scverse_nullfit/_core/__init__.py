"""The machinery behind :func:`scverse_nullfit.tl.fit_null`, one module per pipeline step.

1. :mod:`._read` — where the expression matrix, the GRM and the covariates come from.
2. :mod:`._design` — validation, donor mapping, the design matrix and the stage-1 spectral precompute.
3. :mod:`._suffstats` — one pass over the cells: donor sums, covariate cross-products, centred sums of squares.
4. :mod:`._reml` — the exact REML fit over tau, vectorised over genes.
5. :mod:`._store` — writing the results and the compact projection into the AnnData.

The mathematics is written once, in ``docs/model.md``.
"""
