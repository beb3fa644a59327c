"""The welcome email a model drafts: the prompt it is given, how its answer is read, and what a draft
must be before it is sent. Pure: no network, no settings (tools/draft.py does the call).

A draft is used only if it passes every check: a subject and a body within length bounds, the facts the
client will look for present as given (the company's name, the Jira project key, the contact's name),
and no placeholder left for someone to fill in (``{name}``, ``[Your Name]``, ``<contact>``). Anything
else falls back to the workflow's template, with the reasons recorded.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The first words of the system prompt: the fake model (tools/sandbox/model.py) recognises a draft
# request by them.
DRAFT_MARKER = "You write the welcome email"
FACTS_MARKER = "Facts (JSON):"

SUBJECT_MAX_CHARS = 150
BODY_MIN_CHARS = 80
BODY_MAX_CHARS = 4000
# The most the model may answer (sent as max_tokens): a subject and body at their longest, as JSON, at
# about 3 characters a token. The budget check reserves all of it: an answer is paid before it is read.
MAX_COMPLETION_TOKENS = 1500
# The model decider's count (processors/decision/llm/context.py ``message_tokens``): one token per 4
# characters of each message, rounded up, so a draft's prompt is counted as a decision's is.
CHARS_PER_TOKEN = 4

# Text left for a person to fill in. Braces of any kind; square brackets around words ("[Name]",
# "[Your Company]"); angle brackets around a short phrase ("<contact name>"), not an e-mail address
# written as <a@b.io>, which is legitimate in a mail.
_PLACEHOLDERS = (
    re.compile(r"\{[^{}\n]{0,60}\}"),
    re.compile(r"\[[^\[\]\n]*[A-Za-z][^\[\]\n]{0,60}\]"),
    re.compile(r"<(?![^<>\n]*@)[^<>\n]{1,60}>"),
)

SYSTEM_PROMPT = (
    f"{DRAFT_MARKER} a B2B software company sends to the contact of a client it has just onboarded. "
    "Write it from the facts given, in plain text (no markdown), warm and concrete, 60 to 250 words. "
    "Greet the contact by the exact name given, name the company exactly as given, and give the Jira "
    "project key exactly as given. Invent no facts, and leave no placeholder to fill in. "
    'Answer with one JSON object and nothing else: {"subject": "...", "body": "..."}.'
)


class Facts(BaseModel):
    """What the draft is written from: the request and the enrichment."""

    model_config = ConfigDict(frozen=True)

    company_name: str = Field(min_length=1)
    company_domain: str = ""
    contact_name: str = Field(min_length=1)
    jira_key: str = Field(min_length=1)
    industry: str = ""
    employees: int | None = None
    country: str = ""
    goal: str = ""

    @field_validator("employees", mode="before")
    @classmethod
    def _unknown_is_none(cls, value: object) -> object:
        # A workflow passes "" when the enrichment did not say (`{... | default: }`).
        return None if value == "" else value

    def required(self) -> dict[str, str]:
        """The facts a draft must contain, by what they are."""
        return {"company name": self.company_name, "Jira key": self.jira_key, "contact name": self.contact_name}


class Draft(BaseModel):
    model_config = ConfigDict(frozen=True)

    subject: str
    body: str


class UnreadableAnswer(ValueError):
    """The model's answer is not the JSON object the prompt asks for."""


def messages(facts: Facts) -> list[dict[str, Any]]:
    known = {k: v for k, v in facts.model_dump().items() if v not in ("", None)}
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{FACTS_MARKER}\n{json.dumps(known, indent=1, sort_keys=True)}"},
    ]


def prompt_tokens(sent: list[dict[str, Any]]) -> int:
    """The prompt's tokens, counted as the model decider counts its own before a call."""
    return sum(math.ceil(len(str(m.get("content") or "")) / CHARS_PER_TOKEN) for m in sent)


def facts_of(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The facts a draft request carries (None: not a draft request): what the fake model writes from."""
    if not messages or DRAFT_MARKER not in str(messages[0].get("content") or ""):
        return None
    for message in messages[1:]:
        text = str(message.get("content") or "")
        if FACTS_MARKER in text:
            found = json.loads(text.split(FACTS_MARKER, 1)[1])
            return found if isinstance(found, dict) else None
    return None


def read_answer(content: str | None) -> Draft:
    """The draft in the model's answer; a fenced JSON block (```json ... ```) is accepted."""
    text = (content or "").strip()
    fenced = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        return Draft.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise UnreadableAnswer(
            f"the answer is not a JSON object with text fields subject and body ({where}: {first['msg']})"
        ) from None


def problems(draft: Draft, facts: Facts) -> list[str]:
    """Why the draft cannot be sent; empty: it can."""
    found: list[str] = []
    subject, body = draft.subject.strip(), draft.body.strip()
    if not subject:
        found.append("the subject is empty")
    elif len(subject) > SUBJECT_MAX_CHARS:
        found.append(f"the subject has {len(subject)} characters, more than {SUBJECT_MAX_CHARS}")
    if "\n" in subject:
        found.append("the subject spans several lines")
    if len(body) < BODY_MIN_CHARS:
        found.append(f"the body has {len(body)} characters, fewer than {BODY_MIN_CHARS}")
    elif len(body) > BODY_MAX_CHARS:
        found.append(f"the body has {len(body)} characters, more than {BODY_MAX_CHARS}")
    text = f"{subject}\n{body}"
    for what, value in facts.required().items():
        if value.casefold() not in text.casefold():
            found.append(f"the {what} {value!r} is missing")
    for pattern in _PLACEHOLDERS:
        left = pattern.search(text)
        if left:
            found.append(f"a placeholder is left: {left.group(0)!r}")
            break
    return found
