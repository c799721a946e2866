"""The vocabulary every command shares: exit codes and the error that names file:line."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1       # runtime failure (log not writable, backend error while running)
EXIT_USAGE = 2         # bad arguments, rules or configuration
EXIT_NO_BACKEND = 3    # the requested backend (or any, with auto) cannot run here

EXIT_CODES_HELP = """exit codes:
  0  success
  1  runtime failure (log file not writable, backend failed while running)
  2  bad arguments, rules or configuration (the message names the file and line)
  3  no usable backend (the message says what the host lacks)
"""


class LocatedError(ValueError):
    """Bad input read from a file: the message is prefixed with file:line."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        self.reason = message
        self.source = source
        self.line = line
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(where + message)
