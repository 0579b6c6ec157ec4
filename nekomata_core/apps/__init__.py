"""The applications built on the library: one module per `nekomata` command, plus the checkpoint builder.

Each is a function first (`perplexity(...)`, `parity_report(...)`, `make_checkpoint(...)`, `run_bench(...)`)
and a CLI command second; `cli.py` dispatches by name. The library (`nekomata_core.*` outside this
package) never imports anything from here.
"""
