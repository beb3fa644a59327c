"""A stand-in OTLP/HTTP trace collector for tests: decodes every export it is sent and keeps the spans."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: int
    span_id: int
    parent_id: int  # 0: a root span
    name: str


class Receiver:
    def __init__(self, url: str) -> None:
        self.url = url
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.paths: set[str] = set()

    def add(self, path: str, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.paths.add(path)
            self._spans.extend(spans)

    def spans(self, trace_id: int | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP endpoint on a free port for the block; its URL is ``receiver.url``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = ExportTraceServiceRequest()
            request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
            got = []
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource.scope_spans:
                    for s in scope.spans:
                        parent = int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else 0
                        span_id, trace_id = int.from_bytes(s.span_id, "big"), int.from_bytes(s.trace_id, "big")
                        got.append(ReceivedSpan(service, trace_id, span_id, parent, s.name))
            receiver.add(self.path, got)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
