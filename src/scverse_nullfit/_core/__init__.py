"""The model maths on arrays, one module per pipeline step; no file reading (that is ``io``) and no choice of
execution backend (``tl`` chooses between the in-process and the dask functions).

1. :mod:`._read` — the expression matrix, read chunk by chunk in its own layout.
2. :mod:`._design` — validation, donor mapping, the design matrix and the stage-1 spectral precompute.
3. :mod:`._suffstats` — one pass over the cells: donor sums, covariate cross-products, centred sums of squares.
4. :mod:`._reml` — the exact REML fit over tau, vectorised over genes.
5. :mod:`._store` — the results and the compact projection as they are written into the AnnData.
6. :mod:`._dask` — the dask counterparts of 3 and 4 (map-reduce of the statistics, gene chunks on workers).
7. :mod:`._step2` — the step-2 engine: the compact null model, variant rotation, chunked score statistics.

The mathematics is written once, in ``docs/model.md``.
"""
