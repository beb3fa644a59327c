"""Command signing: only the pipeline can command a tool.

The decision processor signs every ``ToolCommand`` it produces; a tool runs a command only if its
signature verifies. Writing to a command topic is therefore not enough to make a tool act, and a tool
needs nothing of the decision layer (no read of its tables) to tell a real command from a forgery.

What is signed: HMAC-SHA256, under a shared key, of a canonical encoding of the command's identity
(``command_id``, ``run_id``, ``decision_id``, ``tool``, ``step``, ``operation``) and the SHA-256 of the
canonical JSON of its arguments, and (when set) the memory versions and the model budget the command
carries. The signature travels in the event as ``v1:<key id>:<hex>``: the key
id tells a verifier which of its keys to use, so two keys can be valid at once while one replaces the
other. Not signed: the envelope (event id, causation, time) and ``deadline_at``; a replayed copy of a
signed command has the same ``command_id``, and the tool ledger runs a command id once.

Keys come from settings only (``STREAMAGENT_COMMAND_KEYS_FILE`` or ``STREAMAGENT_COMMAND_KEYS``), one
``key_id secret`` per line: the FIRST key signs, EVERY listed key verifies. Secrets are ``SecretStr``
and no message here ever contains one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from streamagent.config import ENV_PREFIX, Settings, SettingsError
from streamagent.events import ToolCommand

log = logging.getLogger(__name__)

VERSION = "v1"
# Part of what is MACed, so a v1 command signature can never be mistaken for another use of the key.
_DOMAIN = "streamagent.ToolCommand.v1"
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# 32 characters at least: `streamagent up` writes 64 hex digits (256 bits); a short secret is a typo.
MIN_SECRET_CHARS = 32
_SIGNATURE = re.compile(r"^v1:([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):([0-9a-f]{64})$")
KEYS_VAR = ENV_PREFIX + "COMMAND_KEYS"
KEYS_FILE_VAR = ENV_PREFIX + "COMMAND_KEYS_FILE"


class CommandKeyError(SettingsError):
    """The command signing keys are missing or malformed; the message names the setting, never a secret."""


class CommandKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    key_id: str = Field(pattern=KEY_ID_PATTERN)
    secret: SecretStr = Field(min_length=MIN_SECRET_CHARS)


class CommandKeys(BaseModel):
    """The keys of one process: ``keys[0]`` signs, any of them verifies."""

    model_config = ConfigDict(frozen=True)

    keys: tuple[CommandKey, ...] = Field(min_length=1)

    @property
    def signer(self) -> CommandKey:
        return self.keys[0]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self.keys)

    def get(self, key_id: str) -> CommandKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)


# -- reading keys ------------------------------------------------------------------------------------
def parse_keys(text: str, source: str) -> CommandKeys:
    """Keys from ``key_id secret`` lines (``;`` also separates entries, for an environment variable);
    blank lines and ``#`` comments are skipped. ``source`` names where the text came from, for errors."""
    keys: list[CommandKey] = []
    entries = [e.strip() for line in text.splitlines() for e in line.split(";")]
    for number, entry in enumerate((e for e in entries if e and not e.startswith("#")), start=1):
        parts = entry.split()
        if len(parts) != 2:
            raise CommandKeyError(f"{source}: entry {number} is not `key_id secret` ({len(parts)} words)")
        key_id, secret = parts
        try:
            key = CommandKey(key_id=key_id, secret=SecretStr(secret))
        except ValidationError as exc:
            # Not str(exc): pydantic's message quotes the input, and the input holds a secret.
            fields = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            problems = []
            if "key_id" in fields:
                problems.append(f"key id {key_id!r} must be letters, digits, '.', '_' or '-' (at most 64)")
            if "secret" in fields:
                problems.append(f"the secret of key {key_id!r} is shorter than {MIN_SECRET_CHARS} characters")
            raise CommandKeyError(f"{source}: entry {number}: {'; '.join(problems)}") from None
        if any(k.key_id == key_id for k in keys):
            raise CommandKeyError(f"{source}: key id {key_id!r} is listed twice")
        keys.append(key)
    if not keys:
        raise CommandKeyError(f"{source} lists no key (one `key_id secret` per line)")
    return CommandKeys(keys=tuple(keys))


def load_keys(settings: Settings) -> CommandKeys:
    """The command keys of this process, from ``STREAMAGENT_COMMAND_KEYS`` or else the keys file.

    Raises ``CommandKeyError`` (a ``SettingsError``: the CLI prints one line) when there is none."""
    return read_key_set(
        settings.command_keys.get_secret_value(),
        settings.command_keys_path,
        file_given=settings.command_keys_file is not None,
        inline_var=KEYS_VAR,
        file_var=KEYS_FILE_VAR,
        kind="command signing",
    )


def read_key_set(
    inline: str, path: Path, *, file_given: bool, inline_var: str, file_var: str, kind: str
) -> CommandKeys:
    """A key set (command or approval keys) from its inline setting, else its file; ``kind`` names it in
    messages ("command signing", "approval"), which never contain a secret."""
    if inline.strip():
        return parse_keys(inline, inline_var)
    source = f"{file_var}={path}" if file_given else f"{path} (the default)"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CommandKeyError(
            f"no {kind} key: {source} does not exist; set {file_var} to a file of"
            f" `key_id secret` lines, or {inline_var} (`streamagent up` creates one in its data dir)"
        ) from None
    except OSError as exc:
        raise CommandKeyError(f"cannot read the {kind} keys {source}: {exc.strerror or exc}") from None
    if path.stat().st_mode & 0o077:
        log.warning("%s keys file %s is readable by other users; chmod 600 it", kind, path)
    return parse_keys(text, source)


def create_key_file(
    path: Path,
    header: str = "command signing keys: the first signs, every one verifies (docs/security/command-signing.md)",
) -> bool:
    """Write one fresh random key to ``path`` (mode 0600) unless the file exists; True if written.

    O_EXCL: two processes racing to create it cannot both write, nor overwrite a key in use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key_id = "key-" + time.strftime("%Y%m%d%H%M%S", time.gmtime())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(f"# {header}\n")
        out.write(f"{key_id} {secrets.token_hex(32)}\n")
    return True


# -- signing and verifying ---------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """The one JSON text of a value: sorted keys, no spaces, ASCII. ``default=str`` as the codec does,
    so a value and its wire round trip (tuple → list, datetime → text) give the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def signed_bytes(command: ToolCommand) -> bytes:
    """What the MAC covers. A JSON array, so no field can bleed into its neighbour."""
    digest = hashlib.sha256(canonical_json(command.arguments).encode()).hexdigest()
    fields = [
        _DOMAIN,
        command.command_id,
        command.run_id,
        command.decision_id,
        command.tool,
        command.step,
        command.operation,
        digest,
    ]
    if command.memory:  # covered once it exists: a forged version cannot slip past the staleness check
        fields.append(canonical_json(command.memory))
    if command.budget_tokens is not None or command.budget_cost_usd is not None:
        # Covered once set: a tool that trusts its budget must not be handed a larger one on the way.
        fields.append(canonical_json({"tokens": command.budget_tokens, "cost_usd": command.budget_cost_usd}))
    return canonical_json(fields).encode()


def _mac(command: ToolCommand, key: CommandKey) -> str:
    return hmac.new(key.secret.get_secret_value().encode(), signed_bytes(command), hashlib.sha256).hexdigest()


def signature(command: ToolCommand, keys: CommandKeys) -> str:
    key = keys.signer
    return f"{VERSION}:{key.key_id}:{_mac(command, key)}"


def sign(command: ToolCommand, keys: CommandKeys) -> ToolCommand:
    """``command`` carrying its signature under the first key (any signature it had is replaced)."""
    return command.model_copy(update={"signature": signature(command, keys)})


def verify(command: ToolCommand, keys: CommandKeys) -> str | None:
    """None if ``command`` carries a valid signature under one of ``keys``; else why not, in words."""
    value = command.signature
    if not value:
        return "unsigned: the command carries no signature"
    version = value.split(":", 1)[0]
    if version != VERSION:
        return f"unsupported signature version {version[:16]!r} (this tool verifies {VERSION})"
    match = _SIGNATURE.match(value)
    if match is None:
        return f"malformed signature: expected {VERSION}:<key id>:<64 hex digits>"
    key_id, mac = match.groups()
    key = keys.get(key_id)
    if key is None:
        return f"signed with unknown key {key_id!r} (this tool verifies with: {', '.join(keys.ids)})"
    if not hmac.compare_digest(mac, _mac(command, key)):
        return f"signature does not match the command under key {key_id!r} (altered, or signed with another secret)"
    return None


# -- snapshots ---------------------------------------------------------------------------------------
# The state processor signs every snapshot it publishes with the same keys (another domain, so a
# snapshot MAC can never pass as a command's); the decision processor decides only on snapshots that
# verify. A snapshot written onto the state topic by anyone else names no run the pipeline knows.
#
# What is MACed is the snapshot's bytes on the wire, as encoded with an empty signature: ``signature``
# is the schema's last field, so the signed message is those bytes with the empty string (one 0x00
# byte) replaced by the signature. Exact (no second canonical form to keep in step with the codec)
# and cheap: one HMAC over a kilobyte, no re-encoding on either side.
_SNAPSHOT_DOMAIN = b"streamagent.StateSnapshot.v1\0"
SNAPSHOT_VERSION = "s1"
_SNAPSHOT_SIGNATURE = re.compile(r"^s1:([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):([0-9a-f]{64})$")


def _avro_string(text: str) -> bytes:
    data = text.encode()
    n, out = len(data) << 1, bytearray()  # zigzag of a non-negative length
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out) + data


def _snapshot_mac(key: CommandKey, unsigned: bytes) -> str:
    return hmac.new(key.secret.get_secret_value().encode(), _SNAPSHOT_DOMAIN + unsigned, hashlib.sha256).hexdigest()


def sign_snapshot_bytes(encoded: bytes, keys: CommandKeys) -> bytes:
    """``encoded`` (a current StateSnapshot with an empty signature) with its signature in place."""
    if not encoded.endswith(b"\x00"):
        raise ValueError("sign_snapshot_bytes needs a snapshot encoded with an empty signature")
    key = keys.signer
    return encoded[:-1] + _avro_string(f"{SNAPSHOT_VERSION}:{key.key_id}:{_snapshot_mac(key, encoded)}")


def verify_snapshot_bytes(data: bytes, signature: str, keys: CommandKeys) -> str | None:
    """None if ``data`` (a snapshot as received, whose decoded ``signature`` is given) was signed by
    the state processor under one of ``keys`` and not altered since; else why not."""
    if not signature:
        return "unsigned"
    match = _SNAPSHOT_SIGNATURE.match(signature)
    tail = _avro_string(signature)
    if match is None or not data.endswith(tail):
        return "malformed signature"
    key_id, mac = match.groups()
    key = keys.get(key_id)
    if key is None:
        return f"signed with unknown key {key_id!r}"
    if not hmac.compare_digest(mac, _snapshot_mac(key, data[: -len(tail)] + b"\x00")):
        return "signature does not match (altered, or signed with another secret)"
    return None
