"""A scripted OpenAI-compatible model: POST /v1/chat/completions, for tests and demos.

The model is the one stand-in of the LLM decider's tests, as the sandbox is for the SaaS APIs: the
real ``openai`` client talks to it over real HTTP. A test scripts a queue of answers (a tool call, a
JSON content answer, malformed JSON, an unknown tool, an HTTP error with Retry-After, a delay);
once the queue is empty it answers the workflow's next step, read from the prepared context (the
first ready step of the "Remaining steps" block, with its prepared arguments; ``wait`` when that
step's tool is not offered; ``complete`` when nothing remains), in the style the request asks for; a
request offering no tools and no answer format (a planner's) gets ``PLAN``, a plan in words.
Every request is recorded (model, messages, tools offered, response_format) so tests count calls
and read what was sent; ``GET /_fake/stats`` answers ``{"calls": n, "drafts": m}`` for a server in its
own process. The draft tool's requests (recognised by its prompt) are kept apart (``drafts``, scripted
with ``script_draft``) and answered by default with a mail written from the facts they carry.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from streamagent.tools.drafting import facts_of

# The block of the prepared context the default answer reads (processors/decision/llm/context.py
# writes it; tools do not import processors, so the marker is repeated here).
REMAINING_MARKER = "Remaining steps, in order (JSON):"
# The fake's drafts end with this line: a test can tell a drafted mail from the template's.
DRAFTED_SIGNATURE = "(drafted by the scripted model)"
# What the fake answers a planner (a request offering no tools and no answer format) by default.
PLAN = "1. Run the workflow's steps in order, each once its needs are done. 2. Escalate if a result looks wrong."


@dataclass(frozen=True)
class Answer:
    """One scripted reply. Build with the class methods."""

    tool: str | None = None
    arguments: Any = None  # a dict, or a str sent as is (malformed JSON)
    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    usage: bool = True
    # Further tool calls of the same answer (parallel tool calls), each (tool, arguments).
    more: tuple[tuple[str, Any], ...] = ()
    draft: bool = False  # the default answer to a draft request: a mail from its facts

    @classmethod
    def call(cls, tool: str, arguments: dict[str, Any] | str | None = None, *, usage: bool = True) -> Answer:
        """A tool call (``tools`` style); a str ``arguments`` is sent verbatim."""
        return cls(tool=tool, arguments={} if arguments is None else arguments, usage=usage)

    @classmethod
    def calls(cls, *calls: tuple[str, dict[str, Any] | str]) -> Answer:
        """Several tool calls in one answer (the OpenAI API's parallel tool calls), in order."""
        (tool, arguments), *more = calls
        return cls(tool=tool, arguments=arguments, more=tuple(more))

    @classmethod
    def json(cls, tool: str, arguments: dict[str, Any] | None = None) -> Answer:
        """A ``{"tool", "arguments"}`` content answer (``json_schema`` style)."""
        return cls(content=json.dumps({"tool": tool, "arguments": arguments or {}}))

    @classmethod
    def text(cls, content: str) -> Answer:
        """Content as is: prose, or malformed JSON."""
        return cls(content=content)

    @classmethod
    def error(cls, status: int, retry_after: float | None = None) -> Answer:
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        return cls(status=status, headers=headers)

    @classmethod
    def slow(cls, delay_s: float, then: Answer | None = None) -> Answer:
        """``then`` (default: the next step) after ``delay_s``."""
        base = then or cls()
        return cls(**{**base.__dict__, "delay_s": delay_s})


@dataclass(frozen=True)
class Request:
    at: float  # time.monotonic() when it arrived
    model: str
    messages: list[dict[str, Any]]
    tools: list[str]  # names of the functions offered (tools style)
    response_format: dict[str, Any] | None
    body: dict[str, Any]


class FakeModel:
    """``with FakeModel() as model: model.script(...); settings(openai_base_url=model.url)``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._answers: deque[Answer] = deque()
        self._draft_answers: deque[Answer] = deque()
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        # The draft tool's requests (tools/draft.py) apart from the decider's: a test counting decisions
        # is not disturbed by the mail being drafted, and a scripted decision is never taken by a draft.
        self.drafts: list[Request] = []
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def script(self, *answers: Answer) -> FakeModel:
        with self._lock:
            self._answers.extend(answers)
        return self

    def script_draft(self, *answers: Answer) -> FakeModel:
        """Answers to the draft tool's next requests (then: a good draft from the facts given)."""
        with self._lock:
            self._draft_answers.extend(answers)
        return self

    def start(self) -> FakeModel:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answering -------------------------------------------------------------------------------
    def _take(self, body: dict[str, Any]) -> Answer:
        tools = [t.get("function", {}).get("name", "") for t in body.get("tools") or []]
        request = Request(
            time.monotonic(),
            str(body.get("model", "")),
            list(body.get("messages") or []),
            tools,
            body.get("response_format"),
            body,
        )
        with self._lock:
            if facts_of(request.messages) is not None:
                self.drafts.append(request)
                answer = self._draft_answers.popleft() if self._draft_answers else Answer()
                # Marked as a draft's: a scripted text or error is sent as is, an unscripted one is a draft.
                return answer if answer.content is not None or answer.status != 200 else Answer(draft=True)
            self.requests.append(request)
            return self._answers.popleft() if self._answers else Answer()

    def reply(self, body: dict[str, Any], answer: Answer) -> dict[str, Any]:
        """The chat.completion object for ``answer`` (the next step when it names nothing)."""
        if answer.draft and (facts := facts_of(body.get("messages") or [])):
            # The draft tool's request: a welcome email written from the facts it was given.
            answer = Answer.text(json.dumps(draft_email(facts)))
        if answer.tool is None and answer.content is None and not (body.get("tools") or body.get("response_format")):
            # Neither tools nor an answer format: a planner's request, answered with a plan in words.
            answer = Answer.text(PLAN)
        if answer.tool is None and answer.content is None:
            tool, arguments = next_step(body)
            answer = Answer.json(tool, arguments) if body.get("response_format") else Answer.call(tool, arguments)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool is not None:
            calls = [(answer.tool, answer.arguments), *answer.more]
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.requests)}" + (f"_{i}" if i else ""),
                    "type": "function",
                    "function": {"name": tool, "arguments": args if isinstance(args, str) else json.dumps(args)},
                }
                for i, (tool, args) in enumerate(calls)
            ]
        out: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model", "")),
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if answer.tool else "stop"}],
        }
        if answer.usage:
            prompt = sum(len(str(m.get("content") or "")) for m in body.get("messages") or []) // 4 + 1
            completion = len(json.dumps(message)) // 4 + 1
            out["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return out


def draft_email(facts: dict[str, Any]) -> dict[str, str]:
    """What the fake answers a draft request: a mail that names every fact it was given."""
    industry = facts.get("industry") or "your"
    return {
        "subject": f"{facts.get('company_name')}, welcome aboard: your project {facts.get('jira_key')} is ready",
        "body": (
            f"Dear {facts.get('contact_name')},\n\n"
            f"Thank you for choosing us. Your onboarding project {facts.get('jira_key')} is open, and the team"
            f" that knows the {industry} industry is already on it for {facts.get('company_name')}.\n\n"
            "We will be in touch this week with the first milestones.\n\nThe onboarding team\n"
            f"{DRAFTED_SIGNATURE}"
        ),
    }


def next_step(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What a model that follows the workflow answers: the first ready step, from the first user message."""
    offered = _offered(body)
    user = next((m for m in body.get("messages") or [] if m.get("role") == "user"), None)
    text = str((user or {}).get("content") or "")
    at = text.find(REMAINING_MARKER)
    if at < 0:
        return "escalate", {"reason": "no remaining steps in the context"}
    remaining, _ = json.JSONDecoder().raw_decode(text[at + len(REMAINING_MARKER) :].lstrip())
    if not remaining:
        return "complete", {}
    for item in remaining:
        if item.get("ready"):
            if item["tool"] not in offered:
                return "wait", {"tool": item["tool"]}
            return item["tool"], dict(item.get("arguments") or {})
    return "escalate", {"reason": "no step is ready"}


def _offered(body: dict[str, Any]) -> set[str]:
    if body.get("tools"):
        return {t.get("function", {}).get("name", "") for t in body["tools"]}
    answer_format = body.get("response_format") or {}
    # json_schema: {"json_schema": {"schema": ...}}; json_object (llama-cpp-python): {"schema": ...}
    schema = (answer_format.get("json_schema") or {}).get("schema") or answer_format.get("schema") or {}
    return {b.get("properties", {}).get("tool", {}).get("const", "") for b in schema.get("anyOf", [])}


def _handler(model: FakeModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read model.requests
            return

        def do_GET(self) -> None:
            # What a process outside this one (a benchmark, make demo-llm) reads to count the calls.
            if self.path.rstrip("/") == "/_fake/stats":
                self._send(200, {"calls": model.calls, "drafts": len(model.drafts)})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                return
            answer = model._take(body)
            if answer.delay_s:
                time.sleep(answer.delay_s)  # the scripted slowness of a model
            if answer.status != 200:
                error = {"error": {"message": f"scripted HTTP {answer.status}", "type": "server_error"}}
                self._send(answer.status, error, answer.headers)
                return
            self._send(200, model.reply(body, answer))

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve the fake model on its own, for a demo without a real model:
    ``python -m streamagent.tools.sandbox.model --port 8799`` then
    ``OPENAI_BASE_URL=http://127.0.0.1:8799/v1 STREAMAGENT_DECIDER=llm streamagent demo``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m streamagent.tools.sandbox.model", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args(argv)
    model = FakeModel(args.host, args.port)
    print(f"fake model answering the next workflow step at {model.url}", flush=True)
    try:
        model._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        model._server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
