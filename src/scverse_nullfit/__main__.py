"""``python -m scverse_nullfit``: the same as the ``scverse-nullfit`` command."""

from ._cli import main

raise SystemExit(main())
