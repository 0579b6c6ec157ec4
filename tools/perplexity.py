#!/usr/bin/env python
"""`python tools/perplexity.py ARGS` is `nekomata perplexity ARGS` (see --help).

The logic lives in nekomata_core/apps/perplexity.py so that the command also works from an installed wheel.
"""

from nekomata_core.apps.cli import console_main

if __name__ == "__main__":
    console_main(command="perplexity")
