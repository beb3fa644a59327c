"""The four fake SaaS APIs, free of HTTP: each maps (method, path) to an operation and an
operation plus a parsed request to a response.

The APIs keep only the state a real service would (Jira's projects); effects, idempotency and
faults are the sandbox's business, and the sandbox holds its lock around every call here.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

API_NAMES: tuple[str, ...] = ("enrich", "jira", "email", "slack", "crm")


class Effect(BaseModel):
    """A request the sandbox performed successfully: the thing tests count and compare."""

    model_config = ConfigDict(frozen=True)

    seq: int
    api: str
    op: str
    status: int
    run_id: str | None
    idempotency_key: str | None
    request: Any
    response: Any
    at: datetime


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str  # below the API's prefix, e.g. "/rest/api/3/project"
    params: dict[str, str]  # taken from the path, e.g. the project key of a DELETE
    query: dict[str, str]
    body: Any  # parsed JSON, None when the request had no body
    idempotency_key: str | None
    base_url: str


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: Any  # None means no body (204)
    effect: bool = False  # True when the API did what was asked, so the sandbox records it
    headers: dict[str, str] = field(default_factory=dict)


def error(status: int, message: str) -> ApiResponse:
    return ApiResponse(status, {"error": message})


class FakeApi(Protocol):
    name: str

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        """The operation and path parameters of a request, None when no endpoint matches."""

    def handle(self, op: str, request: ApiRequest) -> ApiResponse: ...

    def reset(self) -> None: ...


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_DOMAIN = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$")
_JIRA_KEY = re.compile(r"^[A-Z][A-Z0-9]{1,9}$")


def _is_email(value: Any) -> bool:
    return isinstance(value, str) and bool(_EMAIL.match(value))


def _email_domain(address: str) -> str:
    return address.rsplit("@", 1)[1].lower()


# --- enrichment -------------------------------------------------------------------------------

_INDUSTRIES = ("Software", "Logistics", "Healthcare", "Fintech", "Retail", "Manufacturing", "Media")
_EMPLOYEES = (8, 25, 60, 150, 400, 1200, 5000)
_COUNTRIES = ("US", "DE", "GB", "FR", "NL", "SE", "CA", "JP")


def _pick(digest: bytes, index: int, choices: tuple[Any, ...]) -> Any:
    return choices[digest[index] % len(choices)]


def company_profile(domain: str) -> dict[str, Any]:
    """A made-up but stable company for a domain: the same domain answers the same in every run."""
    digest = hashlib.sha256(domain.encode()).digest()
    stem = domain.split(".", 1)[0]
    name = " ".join(part.capitalize() for part in stem.split("-") if part) or stem
    industry = _pick(digest, 0, _INDUSTRIES)
    employees = _pick(digest, 1, _EMPLOYEES)
    country = _pick(digest, 2, _COUNTRIES)
    return {
        "name": name,
        "domain": domain,
        "industry": industry,
        "employees": employees,
        "country": country,
        "description": f"{name} is a {industry.lower()} company in {country} with about {employees} staff.",
    }


class EnrichmentApi:
    name = "enrich"

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        if method == "GET" and path == "/v2/companies/find":
            return "find", {}
        return None

    def handle(self, op: str, request: ApiRequest) -> ApiResponse:
        domain = request.query.get("domain", "").strip().lower()
        if not domain:
            return error(400, "query parameter 'domain' is required")
        if not _DOMAIN.match(domain):
            return error(400, f"invalid domain {domain!r}")
        # RFC 2606 reserves .invalid, so it can never be a real company: a dependable 404.
        if domain.endswith(".invalid"):
            return error(404, "company not found")
        return ApiResponse(200, company_profile(domain), effect=True)

    def reset(self) -> None:
        pass


# --- jira -------------------------------------------------------------------------------------

_PROJECT_PATH = "/rest/api/3/project"


@dataclass(frozen=True)
class _Project:
    id: str
    key: str
    name: str
    idempotency_key: str | None


class JiraApi:
    name = "jira"
    _FIRST_ID = 10001

    def __init__(self) -> None:
        self._projects: dict[str, _Project] = {}
        self._ids = itertools.count(self._FIRST_ID)

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        if method == "POST" and path == _PROJECT_PATH:
            return "create", {}
        prefix = _PROJECT_PATH + "/"
        if method == "DELETE" and path.startswith(prefix) and "/" not in path[len(prefix) :]:
            key = path[len(prefix) :]
            if key:
                return "delete", {"key": key}
        return None

    def handle(self, op: str, request: ApiRequest) -> ApiResponse:
        if op == "delete":
            return self._delete(request.params["key"])
        return self._create(request)

    def _create(self, request: ApiRequest) -> ApiResponse:
        body = request.body
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object")
        key, name = body.get("key"), body.get("name")
        if not isinstance(key, str) or not _JIRA_KEY.match(key):
            return error(400, "key must be 2-10 uppercase letters or digits, starting with a letter")
        if not isinstance(name, str) or not name.strip():
            return error(400, "name is required")
        existing = self._projects.get(key)
        # A second create of the same key under another Idempotency-Key is a real collision (two
        # runs picked the same key, or a retry lost its key); answering 409 keeps it visible.
        if existing is not None and (
            existing.idempotency_key is None or existing.idempotency_key != request.idempotency_key
        ):
            return error(409, f"a project with key {key!r} already exists")
        project = existing or _Project(str(next(self._ids)), key, name, request.idempotency_key)
        self._projects[key] = project
        url = f"{request.base_url}/jira{_PROJECT_PATH}/{project.id}"
        return ApiResponse(201, {"id": project.id, "key": key, "self": url}, effect=True)

    def _delete(self, key: str) -> ApiResponse:
        if self._projects.pop(key, None) is None:
            return error(404, f"no project with key {key!r}")
        return ApiResponse(204, None, effect=True)

    def reset(self) -> None:
        self._projects.clear()
        self._ids = itertools.count(self._FIRST_ID)


# --- email ------------------------------------------------------------------------------------


def _recipients(body: dict[str, Any]) -> list[Any] | None:
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        return None
    addresses: list[Any] = []
    for personalization in personalizations:
        to = personalization.get("to") if isinstance(personalization, dict) else None
        if not isinstance(to, list) or not to:
            return None
        addresses.extend(item.get("email") if isinstance(item, dict) else None for item in to)
    return addresses


class EmailApi:
    name = "email"

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        if method == "POST" and path == "/v3/mail/send":
            return "send", {}
        return None

    def handle(self, op: str, request: ApiRequest) -> ApiResponse:
        body = request.body
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object")
        recipients = _recipients(body)
        if not recipients:
            return error(400, "personalizations[].to[] is required")
        for address in recipients:
            if not _is_email(address):
                return error(400, f"invalid recipient email {address!r}")
            # A mailbox named "bounce" (at any domain) is rejected for good, the way a provider
            # refuses a suppressed address: a dependable permanent error for tests and demos.
            if _email_domain(address) == "bounce.invalid" or address.split("@", 1)[0].lower() == "bounce":
                return error(400, "recipient rejected")
        sender = body.get("from")
        if not isinstance(sender, dict) or not _is_email(sender.get("email")):
            return error(400, "from.email must be a valid email address")
        return ApiResponse(202, {"message_id": str(uuid.uuid4())}, effect=True)

    def reset(self) -> None:
        pass


# --- slack ------------------------------------------------------------------------------------


class SlackApi:
    name = "slack"

    def __init__(self) -> None:
        self._messages = itertools.count(1)

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        if method == "POST" and path == "/api/chat.postMessage":
            return "post_message", {}
        return None

    def handle(self, op: str, request: ApiRequest) -> ApiResponse:
        body = request.body if isinstance(request.body, dict) else {}
        # Slack answers 200 with ok=false for request errors; callers must read the body.
        channel = body.get("channel")
        if not isinstance(channel, str) or not channel:
            return ApiResponse(200, {"ok": False, "error": "channel_not_found"})
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return ApiResponse(200, {"ok": False, "error": "no_text"})
        # The counter makes ts unique even for messages posted in the same second.
        ts = f"{int(time.time())}.{next(self._messages):06d}"
        return ApiResponse(200, {"ok": True, "channel": channel, "ts": ts}, effect=True)

    def reset(self) -> None:
        # The counter survives a reset on purpose: a ts must never repeat within one process.
        pass


# --- crm --------------------------------------------------------------------------------------

_CRM_ACCOUNTS = "/v1/accounts"


class CrmApi:
    """A HubSpot/Salesforce-like account API: ``PUT /v1/accounts/{domain}`` creates or updates.

    The account is keyed by the company's domain, so a repeated call updates the one account instead
    of creating a second; ``created`` says which happened. The sandbox replays a repeated
    Idempotency-Key (and records no second effect) before this is asked.
    """

    name = "crm"
    _FIRST_ID = 5001

    def __init__(self) -> None:
        self._accounts: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(self._FIRST_ID)

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        prefix = _CRM_ACCOUNTS + "/"
        if method == "PUT" and path.startswith(prefix):
            domain = path[len(prefix) :]
            if domain and "/" not in domain:
                return "upsert", {"domain": domain}
        return None

    def handle(self, op: str, request: ApiRequest) -> ApiResponse:
        domain = request.params["domain"].strip().lower()
        if not _DOMAIN.match(domain):
            return error(400, f"invalid domain {domain!r}")
        body = request.body
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            return error(400, "name is required")
        existing = self._accounts.get(domain)
        fields = {k: body[k] for k in ("name", "industry", "employees", "country", "owner_email") if k in body}
        if existing is None:
            account = {"id": str(next(self._ids)), "domain": domain, **fields}
            self._accounts[domain] = account
            return ApiResponse(201, {**account, "created": True}, effect=True)
        existing.update(fields)
        return ApiResponse(200, {**existing, "created": False}, effect=True)

    def reset(self) -> None:
        self._accounts.clear()
        self._ids = itertools.count(self._FIRST_ID)


def make_apis() -> dict[str, FakeApi]:
    apis: list[FakeApi] = [EnrichmentApi(), JiraApi(), EmailApi(), SlackApi(), CrmApi()]
    return {api.name: api for api in apis}
