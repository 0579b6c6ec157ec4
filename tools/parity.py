#!/usr/bin/env python
"""`python tools/parity.py ARGS` is `nekomata parity ARGS` (see --help).

The logic lives in nekomata_core/apps/parity.py so that the command also works from an installed wheel.
"""

from nekomata_core.apps.cli import console_main

if __name__ == "__main__":
    console_main(command="parity")
