"""`python -m nekomata_core` runs the `nekomata` command."""

from .apps.cli import console_main

console_main()
