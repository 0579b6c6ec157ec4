"""What every command shares: its exit codes and the one-line error it raises."""

from __future__ import annotations

from ..errors import NekomataError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CLIError(NekomataError):
    """An expected failure of a command: printed as one line, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
