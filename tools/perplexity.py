#!/usr/bin/env python
"""`python tools/perplexity.py ARGS` is `nekomata perplexity ARGS` (see --help).

The logic lives in nekomata_core/apps/perplexity.py so that the command also works from an installed wheel.
"""

from nekomata_core.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main(command="perplexity"))
