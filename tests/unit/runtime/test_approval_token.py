"""Approval tokens: bound to run, step, tool, arguments and expiry, under a key set of their own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from streamagent.approval import check, load_approval_keys, mint
from streamagent.config import Settings
from streamagent.events import ToolCommand
from streamagent.signing import CommandKeyError, parse_keys

KEYS = parse_keys("new " + "n" * 40 + "\nold " + "o" * 40, "test")
OLD_ONLY = parse_keys("old " + "o" * 40, "test")
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ARGS = {"to": "ada@elsewhere.net", "subject": "Welcome"}


def command(**update: object) -> ToolCommand:
    base = ToolCommand(
        run_id="run-1",
        command_id="c",
        decision_id="d",
        tool="email",
        step="email",
        arguments=ARGS,
        deadline_at=T0 + timedelta(minutes=2),
    )
    return base.model_copy(update=update)


def token(keys=KEYS, **update: object) -> str:  # type: ignore[no-untyped-def]
    fields = {
        "run_id": "run-1",
        "step": "email",
        "tool": "email",
        "arguments": ARGS,
        "expires_at": T0 + timedelta(minutes=2),
    }
    fields.update(update)
    return mint(fields["run_id"], fields["step"], fields["tool"], fields["arguments"], fields["expires_at"], keys)  # type: ignore[arg-type]


def test_a_token_for_exactly_this_command_passes_until_it_expires() -> None:
    good = command(approval=token())
    assert check(good, KEYS, at=T0) is None
    assert "expired" in (check(good, KEYS, at=T0 + timedelta(minutes=3)) or "")


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"arguments": {**ARGS, "to": "eve@evil.example"}}, "does not match"),
        ({"run_id": "run-2"}, "does not match"),
        ({"step": "slack"}, "does not match"),
        ({"approval": ""}, "no approval token"),
        ({"approval": "a1:new:123:zz"}, "malformed"),
    ],
)
def test_a_token_is_refused_for_anything_but_what_was_approved(update: dict[str, object], reason: str) -> None:
    cmd = command(approval=token()).model_copy(update=update)
    assert reason in (check(cmd, KEYS, at=T0) or "")


def test_the_expiry_is_part_of_what_is_signed() -> None:
    forged = token().split(":")
    forged[2] = str(int(forged[2]) + 3_600_000)  # an hour more
    assert "does not match" in (check(command(approval=":".join(forged)), KEYS, at=T0) or "")


def test_rotation_a_token_under_the_old_key_verifies_while_both_are_listed() -> None:
    old = command(approval=token(OLD_ONLY))
    assert check(old, KEYS, at=T0) is None
    assert "unknown key 'new'" in (check(command(approval=token()), OLD_ONLY, at=T0) or "")


def test_keys_come_from_settings_never_from_an_event(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CommandKeyError, match="no approval key"):
        load_approval_keys(Settings(data_dir=tmp_path))
    inline = Settings(approval_keys=SecretStr("k " + "x" * 40))
    assert load_approval_keys(inline).ids == ("k",)
