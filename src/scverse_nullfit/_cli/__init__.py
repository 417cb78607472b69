"""The ``scverse-nullfit`` command line, one module per job.

- :mod:`._main`: ``main``, the entry point (parse, run, report errors).
- :mod:`._parser`: the argument parser.
- :mod:`._fit_null`: the ``fit-null`` and ``demo`` commands.
- :mod:`._step2`: the ``score-test``, ``cis-map`` and ``trans-map`` commands (genotype file in, TSV/Parquet out).
- :mod:`._table`: the phenotype table as an AnnData.
- :mod:`._common`: the program name, :class:`CLIError` and argument helpers.
"""

from ._main import main

__all__ = ["main"]
