"""The ``scverse-nullfit`` command line: parse, then run the command, turning errors into one-line messages.

``scverse-nullfit fit-null INPUT.h5ad -o OUTPUT.h5ad ...`` fits the null models of every gene and writes a copy of
the input with the results; ``scverse-nullfit demo`` (or ``fit-null --example``) runs the whole fit on the built-in
simulated example and compares the estimates with the truth. A TSV of phenotypes and covariates can stand in for the
h5ad, with the flags of the Rust ``step1-fit-null`` tool. ``score-test``, ``cis-map`` and ``trans-map`` read a fitted
h5ad and a genotype file and write TSV or Parquet tables. Nothing heavier than argparse is imported before a
command runs.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Sequence

from ._common import PROG, Terminated, one_line
from ._parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scverse-nullfit`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    The exit status: 0 on success, 2 on bad input (with a one-line message on stderr), 1 on an unexpected error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help, --version or a usage error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2

    from scanpy import settings

    if args.command in ("score-test", "cis-map", "trans-map"):
        from ._step2 import STEP2_COMMANDS

        run = STEP2_COMMANDS[args.command]
    elif args.command == "export-tensorqtl":
        from ._export import run_export as run
    else:
        from ._fit_null import run_fit as run

    old_verbosity, old_logfile = settings.verbosity, settings.logfile
    settings.verbosity = 0 if args.quiet else 4 if args.debug else 2
    settings.logfile = sys.stderr  # the current stream (scanpy keeps the one it saw at import)

    def show(message, category, filename, lineno, file=None, line=None):
        if not args.quiet:
            text = f"{category.__name__}: {message}" if args.debug else str(message)
            print(f"{PROG}: warning: {' '.join(text.split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, KeyError, OSError, ImportError) as err:  # FileNotFoundError is an OSError
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(err).__name__}: {one_line(err)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        settings.verbosity = old_verbosity
        settings.logfile = old_logfile


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
