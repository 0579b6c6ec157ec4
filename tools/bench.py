"""Benchmark nekomata_core against transformers on one checkpoint (same as `nekomata bench`).

python tools/bench.py bench-620m --dtype bfloat16 --also static:int8 --json bench.json
"""

from nekomata_core.apps.cli import console_main

if __name__ == "__main__":
    console_main(command="bench")
