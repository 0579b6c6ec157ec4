#!/usr/bin/env python
"""`python tools/byte2token.py ARGS` is `nekomata byte2token ARGS` (see --help).

The logic lives in nekomata_core/apps/byte2token.py so that the command also works from an installed wheel.
"""

from nekomata_core.apps.cli import console_main

if __name__ == "__main__":
    console_main(command="byte2token")
