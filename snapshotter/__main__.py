"""Allow ``python -m snapshotter`` as an alias of the ``clip`` command."""

from snapshotter.cli import main

raise SystemExit(main())
