"""``python -m imkit``: the same as the ``imkit`` command."""

from __future__ import annotations

from imkit.cli import main

raise SystemExit(main())
