"""streamagent.tracing: nothing when off (not even an import), one trace per run when on, and real
OTLP/HTTP exports to an endpoint (a stub receiver in this test, decoding the protobuf it is sent)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamagent import tracing
from streamagent.config import Settings

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(Settings(), "test", exporter=exporter)
    yield exporter
    tracing.shutdown()


def test_off_by_default_is_one_shared_no_op_and_imports_nothing() -> None:
    assert Settings().otlp_endpoint == ""
    assert not tracing.configure(Settings(), "test")
    assert tracing.span("decision", "run-1") is tracing.span("tool x", "run-2")  # the same nullcontext
    with tracing.span("decision", "run-1") as current:
        assert current is None
    # A process that imports every module on the hot paths, tracing off: no OpenTelemetry in it.
    code = (
        "import sys; import streamagent.console.cli, streamagent.processors.state.app,"
        " streamagent.processors.decision.processor, streamagent.tools.sdk.runner, streamagent.tracing;"
        " print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_a_runs_trace_and_root_are_derived_from_its_id() -> None:
    assert tracing.run_trace_id("run-1") == tracing.run_trace_id("run-1") != tracing.run_trace_id("run-2")
    assert 0 < tracing.run_trace_id("run-1") < 2**128 and 0 < tracing.run_span_id("run-1") < 2**64


def test_spans_of_a_run_join_its_trace_under_its_root(spans: InMemorySpanExporter) -> None:
    with (
        tracing.span("decision", "run-1", {"streamagent.snapshot.version": 3}) as decision,
        tracing.model_call("openai", "test-model", "llm"),
    ):
        pass
    with pytest.raises(RuntimeError), tracing.span("tool jira", "run-1"):
        raise RuntimeError("HTTP 503")
    with tracing.span("decision", "run-2"):
        pass
    started = datetime(2026, 1, 1, tzinfo=UTC)
    tracing.run_ended("run-1", "completed", started, started + timedelta(seconds=3), {"streamagent.workflow": "w"})

    by_name = {(s.name, s.attributes.get("streamagent.run_id")): s for s in spans.get_finished_spans()}
    root = by_name[("run", "run-1")]
    assert root.context.trace_id == tracing.run_trace_id("run-1")
    assert root.context.span_id == tracing.run_span_id("run-1")
    assert root.parent is None
    assert (root.end_time - root.start_time) == 3_000_000_000
    for name in ("decision", "tool jira"):
        span = by_name[(name, "run-1")]
        assert span.context.trace_id == root.context.trace_id
        assert span.parent is not None and span.parent.span_id == root.context.span_id
    assert by_name[("tool jira", "run-1")].status.status_code.name == "ERROR"
    chat = by_name[("chat test-model", None)]
    assert chat.parent is not None and chat.parent.span_id == decision.get_span_context().span_id
    assert chat.context.trace_id == tracing.run_trace_id("run-1")
    assert chat.attributes["gen_ai.system"] == "openai"
    assert chat.attributes["gen_ai.request.model"] == "test-model"
    assert by_name[("decision", "run-2")].context.trace_id == tracing.run_trace_id("run-2")


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: decodes each export and keeps its spans."""

    received: list[tuple[str, bytes, bytes, str]] = []  # (path, trace id, parent span id, name)
    lock = threading.Lock()

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.received.append((self.path, span.trace_id, span.parent_span_id, span.name))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_spans_are_exported_over_otlp_http_to_the_configured_endpoint() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Collector.received = []
    try:
        settings = Settings(otlp_endpoint=f"http://127.0.0.1:{server.server_address[1]}")
        assert tracing.configure(settings, "test")
        for step in ("enrich", "jira", "email"):
            with tracing.span("decision", "run-otlp"), tracing.span(f"tool {step}", "run-otlp"):
                pass
        tracing.shutdown()  # flushes the batch processor: the export has happened when it returns
    finally:
        server.shutdown()
        server.server_close()
    trace_id = tracing.run_trace_id("run-otlp").to_bytes(16, "big")
    received = _Collector.received
    assert {path for path, *_ in received} == {"/v1/traces"}
    assert len(received) == 6
    assert {t for _, t, _, _ in received} == {trace_id}
    decisions = [p for _, _, p, name in received if name == "decision"]
    assert decisions == [tracing.run_span_id("run-otlp").to_bytes(8, "big")] * 3


def test_an_endpoint_without_opentelemetry_installed_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were not installed
    assert not tracing.configure(Settings(otlp_endpoint="http://127.0.0.1:4318"), "test")
    assert not tracing.enabled()
    assert "pip install -e '.[tracing]'" in caplog.text
