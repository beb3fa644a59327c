"""Approval tokens: the guard's proof, checked by the tool, that a person approved this exact call.

When a person approves a held step (``streamagent approve RUN STEP``), the guard puts a token on the
command it then produces: ``a1:<key id>:<expiry ms>:<hex>``, an HMAC-SHA256 over (run, step, tool,
the SHA-256 of the arguments' canonical JSON, expiry). The tool SDK checks it before the external
call of any command that policy says needs approval, so a command that needs approval and lacks a
valid token (forged by a producer that holds the command key, replayed from another run, arguments
changed after the approval, past its expiry) is dead-lettered as ``unapproved`` and does nothing.

The key is not the command signing key: ``STREAMAGENT_APPROVAL_KEYS_FILE`` or
``STREAMAGENT_APPROVAL_KEYS`` (default ``<data dir>/approval-keys``, created by ``streamagent up``),
``key_id secret`` per line, the first signs, every one verifies (rotation as for command keys).
Nothing in an event carries a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime

from streamagent.config import ENV_PREFIX, Settings
from streamagent.events import ToolCommand
from streamagent.signing import CommandKey, CommandKeys, canonical_json, read_key_set

VERSION = "a1"
_DOMAIN = "streamagent.Approval.v1"
_TOKEN = re.compile(r"^a1:([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):([0-9]{1,16}):([0-9a-f]{64})$")
KEYS_VAR = ENV_PREFIX + "APPROVAL_KEYS"
KEYS_FILE_VAR = ENV_PREFIX + "APPROVAL_KEYS_FILE"


def arguments_digest(arguments: object) -> str:
    """The SHA-256 of the arguments' canonical JSON: what an approval is bound to."""
    return hashlib.sha256(canonical_json(arguments).encode()).hexdigest()


def load_approval_keys(settings: Settings) -> CommandKeys:
    """The approval keys of this process (the guard signs with the first, tools verify with any)."""
    return read_key_set(
        settings.approval_keys.get_secret_value(),
        settings.approval_keys_path,
        file_given=settings.approval_keys_file is not None,
        inline_var=KEYS_VAR,
        file_var=KEYS_FILE_VAR,
        kind="approval",
    )


def _message(run_id: str, step: str, tool: str, digest: str, expires_ms: int) -> bytes:
    return canonical_json([_DOMAIN, run_id, step, tool, digest, expires_ms]).encode()


def _mac(key: CommandKey, message: bytes) -> str:
    return hmac.new(key.secret.get_secret_value().encode(), message, hashlib.sha256).hexdigest()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def mint(run_id: str, step: str, tool: str, arguments: object, expires_at: datetime, keys: CommandKeys) -> str:
    key = keys.signer
    expires_ms = _ms(expires_at)
    mac = _mac(key, _message(run_id, step, tool, arguments_digest(arguments), expires_ms))
    return f"{VERSION}:{key.key_id}:{expires_ms}:{mac}"


def check(command: ToolCommand, keys: CommandKeys, at: datetime | None = None) -> str | None:
    """None if ``command`` carries a valid, unexpired approval for exactly its run, step, tool and
    arguments; else why not, in words (the dead letter's detail)."""
    token = command.approval
    if not token:
        return "no approval token: this command needs a person's approval (policy) and carries none"
    match = _TOKEN.match(token)
    if match is None:
        return f"malformed approval token: expected {VERSION}:<key id>:<expiry ms>:<64 hex digits>"
    key_id, expires, mac = match.groups()
    key = keys.get(key_id)
    if key is None:
        return f"approval token under unknown key {key_id!r} (this tool verifies with: {', '.join(keys.ids)})"
    message = _message(command.run_id, command.step, command.tool, arguments_digest(command.arguments), int(expires))
    if not hmac.compare_digest(mac, _mac(key, message)):
        return (
            "approval token does not match this command"
            " (another run, step or tool, or arguments changed after the approval)"
        )
    moment = at or datetime.now(UTC)
    if _ms(moment) > int(expires):
        when = datetime.fromtimestamp(int(expires) / 1000, UTC).isoformat(timespec="seconds")
        return f"approval token expired at {when}"
    return None
