"""`python -m nekomata_core` runs the `nekomata` command."""

from .apps.cli import main

raise SystemExit(main())
