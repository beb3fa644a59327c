"""Why a message is refused: one shape for every processor, so dead letters all carry a reason tag."""

from __future__ import annotations


class Rejected(Exception):
    """A message that will never be handled as it is. ``reason`` is a short, stable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(Rejected, ValueError):
    """The bytes are not an event this runtime can read."""


class Unprocessable(Rejected):
    """A well-formed event that cannot be handled (an unknown run, an unexpected type)."""
