"""Why a message is refused (one shape for every processor, so dead letters all carry a reason tag), and
which failures are outages of a dependency rather than the message's fault."""

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


class DependencyUnavailable(Exception):
    """A dependency (``postgres``, ``kafka``, ``sandbox``) did not answer: an outage, not the message's fault."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} unavailable: {detail}")
        self.dependency = dependency
        self.detail = detail


def outage(exc: BaseException) -> str | None:
    """The dependency whose outage caused ``exc`` (``postgres``, ``kafka``, ``sandbox``, ``network``), or
    None when ``exc`` is not an outage (a bad message, a bug), which retrying cannot fix.

    The one place that tells a transient failure from a permanent one. An outage is retried for as long
    as it lasts and never dead-letters a message; everything else is retried a few times, then isolated
    to the message that causes it and dead-lettered with its reason.
    """
    import httpx
    import psycopg
    from confluent_kafka import KafkaError, KafkaException

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DependencyUnavailable):
            return current.dependency
        if isinstance(current, Rejected):
            return None
        # OperationalError: refused or lost connections, "the database system is starting up"
        # (CannotConnectNow), AdminShutdown/CrashShutdown, serialization failures, deadlocks.
        # InterfaceError: "the connection is closed" and other client-side connection states.
        if (getattr(current, "sqlstate", None) or "").startswith("54"):
            return None  # program limit exceeded (a statement too large or complex): the same every time
        if isinstance(current, psycopg.OperationalError | psycopg.InterfaceError):
            return "postgres"
        if isinstance(current, httpx.TransportError):
            return "sandbox"
        if isinstance(current, KafkaException):
            error = current.args[0] if current.args else None
            if isinstance(error, KafkaError) and (error.retriable() or error.code() in _KAFKA_OUTAGE_CODES):
                return "kafka"
        if isinstance(current, BufferError):  # the producer queue is full: the broker is not taking data
            return "kafka"
        if isinstance(current, ConnectionError):
            return "network"
        current = current.__cause__ or current.__context__
    return None


def _kafka_outage_codes() -> frozenset[int]:
    from confluent_kafka import KafkaError

    names = ("_TRANSPORT", "_ALL_BROKERS_DOWN", "_MSG_TIMED_OUT", "_TIMED_OUT", "_RESOLVE", "_WAIT_COORD")
    return frozenset(getattr(KafkaError, name) for name in names if hasattr(KafkaError, name))


_KAFKA_OUTAGE_CODES = _kafka_outage_codes()
