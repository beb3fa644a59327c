"""Producing onboarding requests, as an upstream system (a CRM, a signup form) would."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from streamagent import codec
from streamagent.config import Settings
from streamagent.events import RunRequested, new_id
from streamagent.kafka import producer
from streamagent.topics import RUN_REQUESTS


class InvalidRequest(ValueError):
    """A request that must not be produced; the message names every bad field."""


def describe(exc: ValidationError, flags: bool = True) -> str:
    """Every bad field, by name; with ``flags``, also the flag that sets it (a request given by flags)."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "request"
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: not a request field")
        elif flags:
            parts.append(f"{field} (--{field.replace('_', '-')}): {error['msg']}")
        else:
            parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)


def build_request(
    fields: dict[str, Any], workflows: Collection[str] | None = None, *, flags: bool = True
) -> RunRequested:
    """A valid request; with ``workflows`` (the known names), one naming another workflow is refused."""
    data = {k: v for k, v in fields.items() if v is not None}
    data.setdefault("run_id", new_id())
    try:
        request = RunRequested.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc, flags)) from exc
    if workflows is not None and request.workflow not in workflows:
        known = ", ".join(sorted(workflows)) or "none"
        where = "workflow (--workflow)" if flags else "workflow"
        raise InvalidRequest(f"{where}: unknown workflow {request.workflow!r} (known: {known})")
    return request


def read_jsonl(
    path: Path, workflows: Collection[str] | None = None, *, skip_invalid: bool = False
) -> tuple[list[RunRequested], list[str]]:
    """The file's requests and what is wrong with the other lines (``line N: …``). Without
    ``skip_invalid`` every line must be valid, or nothing is produced (``InvalidRequest``)."""
    requests, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            if not isinstance(fields, dict):
                raise InvalidRequest("a line must hold a JSON object")
            requests.append(build_request(fields, workflows, flags=False))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
        except InvalidRequest as exc:
            problems.append(f"line {number}: {exc}")
    if problems and not skip_invalid:
        raise InvalidRequest("\n".join(problems))
    return requests, problems


def produce_requests(settings: Settings, requests: Iterable[RunRequested]) -> list[str]:
    """Send requests as any upstream system does: to the intake topic, which validates, deduplicates and
    signs them onto the run log. Each names its run id, so a request sent again starts no second run."""
    p = producer(settings)
    run_ids = []
    for request in requests:
        p.produce(settings.topic(RUN_REQUESTS), key=request.run_id.encode(), value=codec.encode(request))
        run_ids.append(request.run_id)
        p.poll(0)
    remaining = p.flush(30)
    if remaining:
        raise RuntimeError(f"{remaining} requests were not acknowledged by the broker")
    return run_ids
