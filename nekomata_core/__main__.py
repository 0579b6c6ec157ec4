"""`python -m nekomata_core` runs the `nekomata` command."""

from .cli import main

raise SystemExit(main())
