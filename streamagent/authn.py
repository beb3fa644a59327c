"""Who wrote an event: every event that changes a run carries its writer's authentication.

The run log (``agent.run.events``) and the results topic are folded into every run's state, so a write
to them must be as good as the component whose job it is: intake's requests, the decision processor's
decisions and endings, the state processor's timer events, a tool's results for the commands it was
sent, an operator's approvals. Topic ACLs say who may *write* a topic (ops/kafka-acls); this says who
*wrote* a record, and it is checked where the record is used, so a producer that holds no key (or a key
of another role) changes nothing even where ACLs are missing or too wide.

How. A record's ``streamagent-auth`` header is ``e1:<role>:<key id>:<hex>``: HMAC-SHA256 over the
role and the record's value bytes, exactly as on the wire (no second canonical form; the value holds
the run id, event id and every field), under the *role's key*. A role's key is derived from the
pipeline keys (``signing``'s command key set, which the state and decision processors, the projection
and replay hold): ``HMAC(pipeline secret, "streamagent.role.v1\\0" + role)``, under the same key id,
so a pipeline key rotation rotates every role key with it, and two keys are valid at once the same way.
Holders of a role key (intake, each tool, each operator) get that derived key only (``keys issue``):
it signs as that role and as nothing else.

Why HMAC per role, not signatures: the components that verify (state processor, projection, replay)
are the pipeline's trusted core and already hold the pipeline keys; everything outside it holds one
derived key that cannot be turned into another. An HMAC costs ~2 µs a record against ~50-120 µs for
an Ed25519 verification, and every event is verified twice (fold and projection). What HMAC cannot
give is non-repudiation against the core itself: a process holding the pipeline keys could compute an
operator's key. That is the trade taken here (docs/security/trust.md).

Which role may write what (``permitted``) is the second half: a valid tool key still cannot approve a
step, answer for another tool, or end a run.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from streamagent.config import ENV_PREFIX, Settings, SettingsError
from streamagent.events import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    CommandLost,
    CommandResent,
    DecisionRecorded,
    EntityVersion,
    Event,
    MemoryChanged,
    MemoryWrite,
    RunCancelRequested,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    ToolResult,
    is_child_tool,
)
from streamagent.signing import CommandKey, CommandKeyError, CommandKeys, load_keys, parse_keys

HEADER = "streamagent-auth"
VERSION = "e1"
_DERIVE_DOMAIN = b"streamagent.role.v1\0"
_EVENT_DOMAIN = b"streamagent.event.v1\0"

INTAKE = "intake"
DECISION = "decision"
STATE = "state"
# The memory processor: the one writer of the memory topic's entity versions.
MEMORY = "memory"
TOOL_PREFIX = "tool:"
OPERATOR_PREFIX = "operator:"
# Our own components: what they write they built and validated, so a record verified as theirs is decoded
# without validating it again (``codec.decode(trusted=True)``). Intake is one: it validates every request
# it reads from outside (the intake topic) before it signs the RunRequested. A tool's results (what it
# reports about the world, from any team's package) and an operator's answers are validated on every read.
TRUSTED_WRITERS = frozenset({INTAKE, DECISION, STATE, MEMORY})
# A role is a fixed name, or ``tool:<name>`` / ``operator:<identity>``: printable, no spaces, no ':'
# inside the name (the header splits on it).
ROLE_PATTERN = re.compile(
    r"^(intake|decision|state|memory|tool:[a-z][a-z0-9_-]{0,63}|operator:[A-Za-z0-9][A-Za-z0-9_.@-]{0,99})$"
)
_HEADER_VALUE = re.compile(r"^e1:(.+):([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):([0-9a-f]{64})$")

ROLE_KEYS_FILE_VAR = ENV_PREFIX + "ROLE_KEYS_FILE"


class Unauthenticated(Exception):
    """A record whose writer is not proven, or not allowed to write it; ``str`` says which, never a secret."""


def tool_role(tool: str) -> str:
    return TOOL_PREFIX + tool


def operator_role(identity: str) -> str:
    return OPERATOR_PREFIX + identity


def check_role(role: str) -> str:
    if not ROLE_PATTERN.match(role):
        raise ValueError(
            f"role {role!r} is not one of intake, decision, state, memory, tool:<name>, operator:<identity>"
            " (names: letters, digits, '_', '-'; identities may also hold '.' and '@')"
        )
    return role


# -- keys --------------------------------------------------------------------------------------------
def tool_keys(pipeline: CommandKeys, tool: str) -> CommandKeys:
    """The key set of tool ``tool``: the decision processor signs its commands with it, the tool verifies
    them and signs its results with it. A tool holds this and nothing else, so a leaked tool key
    commands, and answers for, that one tool only."""
    return derive(pipeline, tool_role(tool))


@lru_cache(maxsize=1024)
def derive(pipeline: CommandKeys, role: str) -> CommandKeys:
    """The key set of ``role``: one derived key per pipeline key, under the same key ids (first signs)."""
    check_role(role)
    return CommandKeys(
        keys=tuple(
            CommandKey(
                key_id=key.key_id,
                secret=SecretStr(
                    hmac.new(
                        key.secret.get_secret_value().encode(), _DERIVE_DOMAIN + role.encode(), hashlib.sha256
                    ).hexdigest()
                ),
            )
            for key in pipeline.keys
        )
    )


class RoleKeys:
    """One role's keys: what a process that is not the pipeline's core signs with."""

    def __init__(self, role: str, keys: CommandKeys) -> None:
        self.role = check_role(role)
        self.keys = keys

    @property
    def identity(self) -> str:
        """The name after the role's kind: the operator's identity, the tool's name."""
        return self.role.split(":", 1)[1] if ":" in self.role else self.role

    def headers(self, value: bytes) -> list[tuple[str, bytes]]:
        """The record headers that authenticate ``value`` as written by this role."""
        key = self.keys.signer
        return [(HEADER, f"{VERSION}:{self.role}:{key.key_id}:{_mac(key, self.role, value)}".encode())]

    def render(self) -> str:
        """The role key file's text (``read_role_keys`` reads it back)."""
        lines = [
            f"# streamagent role key for {self.role}: derived from the pipeline keys (streamagent keys issue);",
            "# it signs as this role and nothing else. The first key signs.",
            f"role {self.role}",
        ]
        lines += [f"{k.key_id} {k.secret.get_secret_value()}" for k in self.keys.keys]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Write the key file, mode 0600 (replacing one that exists: a re-issue after a rotation)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.render())
        tmp.replace(path)


def issue(pipeline: CommandKeys, role: str) -> RoleKeys:
    return RoleKeys(role, derive(pipeline, role))


def parse_role_keys(text: str, source: str) -> RoleKeys:
    """A role key file: a ``role NAME`` line and ``key_id secret`` lines (comments and blanks skipped)."""
    role: str | None = None
    rest: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("role ") and role is None:
            role = stripped[5:].strip()
        else:
            rest.append(line)
    if role is None:
        raise CommandKeyError(f"{source} names no role (a `role NAME` line, as `streamagent keys issue` writes)")
    try:
        return RoleKeys(role, parse_keys("\n".join(rest), source))
    except ValueError as exc:
        raise CommandKeyError(f"{source}: {exc}") from None


def read_role_keys(path: Path) -> RoleKeys:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CommandKeyError(
            f"no role key: {path} does not exist (`streamagent keys issue ROLE` writes one)"
        ) from None
    except OSError as exc:
        raise CommandKeyError(f"cannot read the role key {path}: {exc.strerror or exc}") from None
    return parse_role_keys(text, str(path))


def role_keys(settings: Settings, role: str) -> RoleKeys:
    """This process's key for ``role``: ``STREAMAGENT_ROLE_KEYS_FILE`` when set (a deployment mounts only
    that file into the process), else derived from the pipeline keys (one machine, `up`)."""
    if settings.role_keys_file is not None:
        keys = read_role_keys(settings.role_keys_file)
        if keys.role != role:
            raise CommandKeyError(
                f"{ROLE_KEYS_FILE_VAR}={settings.role_keys_file} is the key of {keys.role}, not {role}"
            )
        return keys
    return issue(load_keys(settings), role)


def operator_keys_path(settings: Settings) -> Path:
    return settings.operator_keys_file or settings.data_dir / "keys" / "operator.keys"


def operator_keys(settings: Settings) -> RoleKeys:
    """The operator key that ``approve`` and ``deny`` sign with (`up` issues one for the local user)."""
    path = operator_keys_path(settings)
    try:
        keys = read_role_keys(path)
    except CommandKeyError as exc:
        raise SettingsError(
            f"{exc}; approvals are signed with an operator key: `streamagent keys issue operator:NAME --out {path}`"
            f" (or set {ENV_PREFIX}OPERATOR_KEYS_FILE)"
        ) from None
    if not keys.role.startswith(OPERATOR_PREFIX):
        raise SettingsError(f"{path} is the key of {keys.role}, not of an operator")
    return keys


# -- verifying ---------------------------------------------------------------------------------------
def _mac(key: CommandKey, role: str, value: bytes) -> str:
    return hmac.new(
        key.secret.get_secret_value().encode(), _EVENT_DOMAIN + role.encode() + b"\0" + value, hashlib.sha256
    ).hexdigest()


def header_value(headers: Any) -> bytes | None:
    """The auth header of a record's headers (a list of pairs, as both Kafka clients give them, or a dict)."""
    if not headers:
        return None
    if isinstance(headers, Mapping):
        found = headers.get(HEADER)
        return found.encode() if isinstance(found, str) else found
    for name, found in headers:
        if name == HEADER:
            return found.encode() if isinstance(found, str) else found
    return None


class Authenticator:
    """Verifies records under the pipeline keys (held by the trusted core: state, projection, replay)."""

    def __init__(self, pipeline: CommandKeys) -> None:
        self.pipeline = pipeline
        self._derived: dict[str, CommandKeys] = {}

    @classmethod
    def of(cls, settings: Settings) -> Authenticator:
        return cls(load_keys(settings))

    def keys_of(self, role: str) -> CommandKeys:
        keys = self._derived.get(role)
        if keys is None:
            keys = self._derived[role] = derive(self.pipeline, role)
        return keys

    def writer(self, value: bytes | None, headers: Any) -> str:
        """The role that wrote ``value``; ``Unauthenticated`` if no role did (no header, a bad MAC)."""
        raw = header_value(headers)
        if raw is None:
            raise Unauthenticated(f"no {HEADER} header: not written by a pipeline component")
        text = raw.decode(errors="replace")
        match = _HEADER_VALUE.match(text)
        if match is None or not ROLE_PATTERN.match(match.group(1)):
            raise Unauthenticated(f"malformed {HEADER} header (expected {VERSION}:<role>:<key id>:<64 hex digits>)")
        role, key_id, mac = match.groups()
        key = self.keys_of(role).get(key_id)
        if key is None:
            raise Unauthenticated(f"signed as {role} with unknown key {key_id!r}")
        if not hmac.compare_digest(mac, _mac(key, role, value or b"")):
            raise Unauthenticated(
                f"signature of {role} does not match the record (altered, or signed with another key)"
            )
        return role

    def verified_writer(self, value: bytes | None, headers: Any) -> str | None:
        """``writer``, or None where it raises: read before decoding, to choose how (``trusted``) and to
        hand to ``verify`` so the MAC is checked once. ``verify`` says what is wrong with a None."""
        try:
            return self.writer(value, headers)
        except Unauthenticated:
            return None

    def verify(
        self, event: Event | MemoryWrite | EntityVersion, value: bytes | None, headers: Any, writer: str | None = None
    ) -> str:
        """``writer`` and ``permitted`` together: the role, or ``Unauthenticated`` naming what is wrong.
        ``writer``: the role ``verified_writer`` found for these bytes (their MAC is not checked twice)."""
        role = writer or self.writer(value, headers)
        problem = permitted(role, event)
        if problem is not None:
            raise Unauthenticated(problem)
        return role


# Which role writes each event type (a tool's results and an operator's answers are checked by name; a
# child run's request is the decision processor's, and a child workflow step's result the state's).
_WRITERS: dict[type[Event], str] = {
    RunRequested: INTAKE,
    DecisionRecorded: DECISION,
    RunCompleted: DECISION,
    RunFailed: DECISION,
    ApprovalRequested: DECISION,
    CommandResent: DECISION,
    MemoryChanged: DECISION,
    RunDeadlineExceeded: STATE,
    ApprovalExpired: STATE,
    CommandLost: STATE,
}


def permitted(role: str, event: Event | MemoryWrite | EntityVersion) -> str | None:
    """None if ``role`` may write ``event``; else why not."""
    if isinstance(event, MemoryWrite | EntityVersion):
        # A change is admitted by intake (from upstream systems and operators alike) or sent by the decision
        # processor (what a run's step found out); only the memory processor, which checks versions,
        # publishes what an entity now is.
        if isinstance(event, MemoryWrite):
            return (
                None
                if role in (INTAKE, DECISION)
                else f"MemoryWrite signed as {role}: only intake or decision writes it"
            )
        return None if role == MEMORY else f"EntityVersion signed as {role}: only memory writes it"
    if isinstance(event, RunRequested) and event.is_child:
        # A child run is started by its parent's decision, never by an upstream system: intake's key
        # cannot start one (nor make a run look like a child and answer for its parent's step).
        return None if role == DECISION else f"a child run's RunRequested signed as {role}: only decision writes it"
    if isinstance(event, ToolResult) and is_child_tool(event.tool):
        # A child workflow's step is answered by the state processor, which folded the child's end.
        return None if role == STATE else f"a result of child workflow {event.tool!r} signed as {role}, not {STATE}"
    if isinstance(event, ToolResult):
        wanted = tool_role(event.tool)
        return None if role == wanted else f"a result of tool {event.tool!r} signed as {role}, not {wanted}"
    if isinstance(event, ApprovalGranted | ApprovalDenied | RunCancelRequested):
        if not role.startswith(OPERATOR_PREFIX):
            what = "cancels a run" if isinstance(event, RunCancelRequested) else "answers an approval"
            return f"{event.type} signed as {role}: only an operator's key {what}"
        identity = role[len(OPERATOR_PREFIX) :]
        if event.by != identity:
            return f"{event.type} says by {event.by!r} but is signed by operator {identity!r}"
        return None
    wanted = _WRITERS.get(type(event))
    if wanted is None:
        return f"{event.type} is not an event of the run log"
    return None if role == wanted else f"{event.type} signed as {role}: only {wanted} writes it"
