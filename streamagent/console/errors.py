"""The one error a command raises for a user's mistake: printed as one line, no traceback."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
