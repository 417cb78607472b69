"""The ``export-tensorqtl`` command: stored results written as tensorQTL's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import CLIError, stop_on_signals
from ._fit_null import _read_h5ad


def run_export(args: argparse.Namespace) -> int:
    """Read RESULTS.h5ad (backed: X stays on disk) and write the tensorQTL tables of ``--key`` / ``--trans-key``."""
    from ..get import tensorqtl_df
    from ..io import write_tensorqtl

    prefix = Path(args.prefix)
    if not prefix.parent.is_dir():
        raise CLIError(f"output directory {str(prefix.parent)!r} does not exist.")
    adata = _read_h5ad(Path(args.input), backed=True)
    tables = {}
    if not args.no_cis:
        tables["nominal"] = tensorqtl_df(adata, args.key, kind="nominal", by_chrom=True)
        tables["genes"] = tensorqtl_df(adata, args.key, kind="gene")
        if isinstance(adata.uns.get(args.key), dict) and "independent" in adata.uns[args.key]:
            tables["independent"] = tensorqtl_df(adata, args.key, kind="independent")
    if args.trans_key is not None:
        tables["trans"] = tensorqtl_df(adata, args.trans_key, kind="trans")
    if not tables:
        raise CLIError("nothing to export: --no-cis without --trans-key.")

    with stop_on_signals():  # write_tensorqtl removes its temporary files when interrupted
        paths = write_tensorqtl(prefix, overwrite=args.overwrite, **tables)
    if not args.quiet:
        for path in paths:
            print(path)
    return 0
