"""Command signing: what verifies, what does not and why, and where the keys come from."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from streamagent import codec, signing
from streamagent.config import Settings, SettingsError, settings_from, to_env
from streamagent.events import ToolCommand
from streamagent.signing import CommandKeyError, parse_keys, sign, verify

SECRET_A = "a" * 64
SECRET_B = "b" * 64
KEYS = parse_keys(f"k-new {SECRET_A}\nk-old {SECRET_B}", "test")


def command(**overrides: Any) -> ToolCommand:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "command_id": "cmd-1",
        "decision_id": "dec-1",
        "tool": "jira",
        "step": "jira",
        "operation": "execute",
        "arguments": {"key": "ACME", "description": "Onboarding Acme", "nested": {"b": [1, 2.5], "a": None}},
        "deadline_at": datetime(2026, 12, 2, 4, 0, tzinfo=UTC),
    }
    fields.update(overrides)
    return ToolCommand(**fields)


def test_a_signed_command_verifies_and_names_the_first_key() -> None:
    signed = sign(command(), KEYS)
    assert signed.signature.startswith("v1:k-new:")
    assert len(signed.signature.rsplit(":", 1)[1]) == 64
    assert verify(signed, KEYS) is None


def test_the_signature_survives_the_wire() -> None:
    signed = sign(command(arguments={"z": 1, "a": [1.0, "ü", {"y": True}], "t": (1, 2)}), KEYS)
    decoded = codec.decode(codec.encode(signed))
    assert isinstance(decoded, ToolCommand)
    assert decoded.signature == signed.signature
    assert verify(decoded, KEYS) is None


def test_argument_order_does_not_matter() -> None:
    one = sign(command(arguments={"a": 1, "b": 2}), KEYS)
    other = command(arguments={"b": 2, "a": 1}).model_copy(update={"signature": one.signature})
    assert verify(other, KEYS) is None


def test_an_old_key_still_verifies() -> None:
    old_only = parse_keys(f"k-old {SECRET_B}", "test")
    signed_with_old = sign(command(), old_only)
    assert signed_with_old.signature.startswith("v1:k-old:")
    assert verify(signed_with_old, KEYS) is None


@pytest.mark.parametrize(
    "change",
    [
        {"arguments": {"key": "EVIL", "description": "Onboarding Acme", "nested": {"b": [1, 2.5], "a": None}}},
        {"arguments": {}},
        {"run_id": "run-2"},
        {"decision_id": "dec-2"},
        {"tool": "email"},
        {"command_id": "cmd-2"},
        {"step": "email"},
        {"operation": "compensate"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_an_altered_command_fails(change: dict[str, Any]) -> None:
    altered = sign(command(), KEYS).model_copy(update=change)
    reason = verify(altered, KEYS)
    assert reason is not None and "does not match" in reason and "k-new" in reason


def test_the_envelope_and_deadline_are_not_signed() -> None:
    # Replays of a signed command are the ledger's business (one effect per command id), not the signature's.
    signed = sign(command(), KEYS)
    moved = signed.model_copy(update={"event_id": "other", "deadline_at": datetime(2030, 1, 1, tzinfo=UTC)})
    assert verify(moved, KEYS) is None


def test_an_unsigned_command_fails() -> None:
    assert verify(command(), KEYS) == "unsigned: the command carries no signature"


def test_an_unknown_key_fails_naming_the_known_ones() -> None:
    other = parse_keys(f"k-rogue {SECRET_A}", "test")
    reason = verify(sign(command(), other), KEYS)
    assert reason == "signed with unknown key 'k-rogue' (this tool verifies with: k-new, k-old)"


def test_a_known_key_id_with_another_secret_fails() -> None:
    impostor = parse_keys(f"k-new {'c' * 64}", "test")
    reason = verify(sign(command(), impostor), KEYS)
    assert reason is not None and reason.startswith("signature does not match")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("garbage", "unsupported signature version 'garbage'"),
        ("v2:k-new:" + "0" * 64, "unsupported signature version 'v2'"),
        ("v1:k-new:xyz", "malformed signature"),
        ("v1:k-new:" + "0" * 63, "malformed signature"),
        ("v1::" + "0" * 64, "malformed signature"),
        ("v1:k-new:" + "A" * 64, "malformed signature"),
        ("v1:k-new:" + "0" * 64, "signature does not match"),
    ],
)
def test_garbage_fails_with_a_clear_reason(value: str, expected: str) -> None:
    reason = verify(command(signature=value), KEYS)
    assert reason is not None and reason.startswith(expected)


# -- keys ---------------------------------------------------------------------------------------------
def test_parse_keys_reads_lines_comments_and_semicolons() -> None:
    keys = parse_keys(f"# rotated 2026-12-02\n\nk2 {SECRET_A}\n  k1   {SECRET_B}  \n", "f")
    assert keys.ids == ("k2", "k1") and keys.signer.key_id == "k2"
    assert parse_keys(f"k2 {SECRET_A}; k1 {SECRET_B}", "v").ids == ("k2", "k1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "f lists no key"),
        ("# only a comment\n", "f lists no key"),
        (f"k1 {SECRET_A} extra", "entry 1 is not `key_id secret` (3 words)"),
        ("k1", "entry 1 is not `key_id secret` (1 words)"),
        ("k1 tooshort-secret", "the secret of key 'k1' is shorter than 32 characters"),
        (f"bad:id {SECRET_A}", "key id 'bad:id' must be"),
        (f"k1 {SECRET_A}\nk1 {SECRET_B}", "key id 'k1' is listed twice"),
    ],
)
def test_malformed_keys_are_refused_without_showing_a_secret(text: str, message: str) -> None:
    with pytest.raises(CommandKeyError, match=r"^f") as caught:
        parse_keys(text, "f")
    assert message in str(caught.value)
    assert "tooshort-secret" not in str(caught.value) and SECRET_A not in str(caught.value)
    assert isinstance(caught.value, SettingsError)  # the CLI prints it as one line


def test_keys_never_show_their_secret() -> None:
    assert SECRET_A not in repr(KEYS) and SECRET_A not in str(KEYS)


def test_load_keys_from_the_default_file_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(CommandKeyError, match="STREAMAGENT_COMMAND_KEYS_FILE") as caught:
        signing.load_keys(settings)
    assert str(tmp_path / "command-keys") in str(caught.value)
    assert signing.create_key_file(tmp_path / "command-keys") is True
    assert signing.create_key_file(tmp_path / "command-keys") is False  # never overwrites a key in use
    assert stat.S_IMODE((tmp_path / "command-keys").stat().st_mode) == 0o600
    keys = signing.load_keys(settings)
    assert len(keys.keys) == 1 and keys.signer.key_id.startswith("key-")
    assert len(keys.signer.secret.get_secret_value()) == 64


def test_load_keys_from_a_named_file_or_inline(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"k-file {SECRET_A}\n")
    env = {"STREAMAGENT_COMMAND_KEYS_FILE": str(path)}
    assert signing.load_keys(settings_from(env)).ids == ("k-file",)
    missing = settings_from({"STREAMAGENT_COMMAND_KEYS_FILE": str(tmp_path / "nope")})
    with pytest.raises(CommandKeyError, match=r"^no command signing key: STREAMAGENT_COMMAND_KEYS_FILE="):
        signing.load_keys(missing)
    inline = settings_from({"STREAMAGENT_COMMAND_KEYS": f"k-env {SECRET_B}"})
    assert signing.load_keys(inline).ids == ("k-env",)
    assert settings_from(to_env(inline)) == inline  # children get the same keys
    assert SECRET_B not in repr(inline)


def test_inline_keys_and_a_keys_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="both set"):
        settings_from({"STREAMAGENT_COMMAND_KEYS": f"k {SECRET_A}", "STREAMAGENT_COMMAND_KEYS_FILE": "/x"})
    assert Settings(command_keys=SecretStr(""), command_keys_file=tmp_path).command_keys_path == tmp_path


# -- snapshots signed by the state processor ---------------------------------------------------------
def test_a_snapshot_verifies_as_sent_and_not_once_altered_or_unsigned() -> None:
    from datetime import timedelta

    from streamagent import codec
    from streamagent.events import OnboardingRequest, RunStatus, StateSnapshot, StepState, now
    from streamagent.signing import sign_snapshot_bytes, verify_snapshot_bytes

    keys = parse_keys("k1 " + "a" * 40, "test")
    moment = now()
    snap = StateSnapshot(
        run_id="r",
        version=1,
        status=RunStatus.running,
        request=OnboardingRequest(
            company_name="A",
            company_domain="a.io",
            contact_name="B",
            contact_email="b@a.io",
            goal="g",
            requested_by="t",
        ),
        steps=[StepState(name="enrich")],
        created_at=moment,
        updated_at=moment,
        deadline_at=moment + timedelta(seconds=0.123456),  # finer than the wire keeps
        last_event_id="e",
    )
    signed = sign_snapshot_bytes(codec.encode(snap), keys)
    received = codec.decode(signed)
    assert isinstance(received, StateSnapshot) and received.signature.startswith("s1:k1:")
    assert verify_snapshot_bytes(signed, received.signature, keys) is None
    altered = codec.encode(received.model_copy(update={"version": 2}))
    assert "does not match" in (verify_snapshot_bytes(altered, received.signature, keys) or "")
    assert verify_snapshot_bytes(codec.encode(snap), "", keys) == "unsigned"
    other = parse_keys("k2 " + "b" * 40, "test")
    assert "unknown key" in (verify_snapshot_bytes(signed, received.signature, other) or "")


@pytest.mark.parametrize(
    "change",
    [{"budget_tokens": 10_000}, {"budget_tokens": None}, {"budget_cost_usd": 5.0}, {"budget_cost_usd": None}],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))}",
)
def test_the_model_budget_a_command_carries_is_signed(change: dict[str, Any]) -> None:
    # A model-backed tool trusts the budget on its command: raising or dropping it on the way must fail.
    signed = sign(command(budget_tokens=500, budget_cost_usd=0.25), KEYS)
    assert verify(signed, KEYS) is None
    again = codec.decode(codec.encode(signed))
    assert isinstance(again, ToolCommand) and (again.budget_tokens, again.budget_cost_usd) == (500, 0.25)
    assert verify(again, KEYS) is None
    reason = verify(signed.model_copy(update=change), KEYS)
    assert reason is not None and "does not match" in reason


def test_a_command_with_no_budget_is_signed_as_before() -> None:
    # No budget (null): the signed bytes are those of a v4 command, so commands signed before still verify.
    assert signing.signed_bytes(command()) == signing.signed_bytes(command(budget_tokens=None, budget_cost_usd=None))
    assert signing.signed_bytes(command()) != signing.signed_bytes(command(budget_tokens=0))
