"""The page's HTTP server: the static page and the read-only JSON endpoints, on the standard library.

Read-only by construction: GET and HEAD only, every other method is refused. Each request runs in its
own thread (``ThreadingHTTPServer``) and opens its own short PostgreSQL connection through
``queries``, so a slow dead-letter read never holds up the runs list. A database that is down is a 503
with the reason, which the page shows; the server itself keeps running.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from confluent_kafka import KafkaException

from streamagent.config import Settings
from streamagent.console.ui.api import PAGE_SIZE, ApiError, Source, parse_runs_query

log = logging.getLogger(__name__)

# The page's files, by the path they are served at; nothing else on disk is reachable.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return resources.files("streamagent.console.ui").joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    server: UiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        try:
            if url.path in STATIC:
                name, kind = STATIC[url.path]
                self._send(HTTPStatus.OK, _static(name), kind)
                return
            if url.path.startswith("/api/"):
                self._json(HTTPStatus.OK, self._api(url.path, dict(parse_qsl(url.query))))
                return
            self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {url.path}"})
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)})
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"PostgreSQL: {reason}"})
        except KafkaException as exc:  # the dead letters, while the broker is away
            error = exc.args[0] if exc.args else None
            reason = error.str() if hasattr(error, "str") else str(exc)
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"Kafka: {reason}"})
        except Exception as exc:  # the page shows the one line; the log keeps the traceback
            log.exception("GET %s failed", url.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

    def _api(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        source = self.server.source
        if path == "/api/health":
            return {"ok": True}
        if path == "/api/config":
            return {"poll_s": source.settings.ui_poll_s, "page_size": PAGE_SIZE}
        if path == "/api/runs":
            return source.runs(parse_runs_query(params))
        if path.startswith("/api/runs/") and len(path) > len("/api/runs/"):
            return source.run(unquote(path.removeprefix("/api/runs/")))
        if path == "/api/approvals":
            return source.approvals()
        if path == "/api/dlq":
            return source.dead_letters()
        raise ApiError(404, f"no endpoint {path}")

    def _refuse(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "read-only: GET only"}, allow="GET, HEAD")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _json(self, status: int, body: dict[str, Any], **headers: str) -> None:
        self._send(status, json.dumps(body, default=str).encode(), "application/json", **headers)

    def _send(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a live view: never an old answer from a cache
        for name, value in headers.items():
            self.send_header(name.replace("_", "-").title(), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        super().__init__((host, port), Handler)
        self.source = Source(settings)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> UiServer:
        """Serve in a background thread (tests); ``serve_forever`` in the foreground otherwise."""
        threading.Thread(target=self.serve_forever, name="ui", daemon=True).start()
        return self


def serve(settings: Settings, host: str, port: int) -> UiServer:
    """A bound server (port 0: a free one), not yet serving."""
    return UiServer(settings, host, port)
