"""The `nekomata` command.

Each command lives in its own module of `nekomata_core.apps` and is a function first (usable without the
CLI) and a command second: the module's `add_<name>_parser(subparsers)` registers it and sets `run`.
`COMMANDS` names each command's module once; this file imports them by name, so imports go one way
(the commands never import this dispatcher). Exit codes: 0 success, 1 the
command ran but found a problem (e.g. a corrupt checkpoint), 2 usage errors and unresolvable paths.
Expected errors print one line on stderr and no traceback (set NEKOMATA_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from ..errors import NekomataError
from .common import EXIT_FAILED, EXIT_USAGE, CLIError

# Modules that import torch (loader, model, ...) are imported inside the commands that need them, so
# that `nekomata --help` and usage errors answer at once instead of after torch's import.

# ====================================================================== the command registry
# command name → the module of nekomata_core.apps that defines `add_<name>_parser`.
COMMANDS: dict[str, str] = {
    "generate": "generate",
    "chat": "generate",
    "inspect": "inspect",
    "bench": "bench",
    "parity": "parity",
    "perplexity": "perplexity",
    "byte2token": "byte2token",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nekomata",
        description="Run and inspect Qwen (v1) checkpoints such as rinna/nekomata-7b.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        add_parser = getattr(importlib.import_module(f"{__package__}.{module}"), f"add_{name}_parser")
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, *, command: str | None = None) -> int:
    """Entry point of the `nekomata` console script and `python -m nekomata_core`.

    `command` runs one subcommand directly with `argv` as its arguments: the `tools/*.py` scripts are
    `main(command="parity")` etc., so they share the parser and the one-line error handling.
    """
    parser = build_parser()
    if command is not None:
        argv = [command, *(sys.argv[1:] if argv is None else argv)]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2); argparse has printed the message
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = args.run(args)
        _leave_process_group()
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Expected errors (bad paths, broken checkpoints) are one line; anything else is a bug and
        # keeps its traceback. NEKOMATA_DEBUG=1 shows the traceback of expected errors too.
        if not isinstance(exc, _expected_errors()) or os.environ.get("NEKOMATA_DEBUG"):
            raise
        print(f"nekomata {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, CLIError) else EXIT_FAILED


def console_main(*, command: str | None = None) -> NoReturn:
    """The `nekomata` console script, `python -m nekomata_core` and the `tools/*.py` scripts (`command`
    names their subcommand): run `main`, exit with its code.

    A torchrun rank ends with `os._exit` once its output is flushed (after `main` has met the other ranks
    and closed the process group): gloo's C++ threads can still be winding down while the interpreter
    runs its static destructors, and about one exit in twenty then aborts with "terminate called without
    an active exception" although every rank finished its work.
    """
    code = main(command=command)
    if "WORLD_SIZE" in os.environ and "torch.distributed" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def _leave_process_group() -> None:
    """Under torchrun (tensor parallelism): wait for every rank, then close the process group, so no rank
    tears gloo/NCCL down while another still uses it (an abort at exit otherwise)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _expected_errors() -> tuple[type[Exception], ...]:
    # Every error the library raises on purpose derives from NekomataError; the kernels package (which
    # knows nothing of the library) has its own, imported only if a kernel was asked for.
    dispatch = sys.modules.get("nekomata_core.kernels.dispatch")
    return (NekomataError, dispatch.KernelUnavailableError) if dispatch is not None else (NekomataError,)
