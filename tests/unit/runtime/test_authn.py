"""Event authentication (streamagent.authn): who wrote a record, and whether that writer may write it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TEST_COMMAND_KEYS, TEST_OLD_KEY

from streamagent import authn, codec
from streamagent.authn import Authenticator, RoleKeys, Unauthenticated, issue, read_role_keys, tool_keys
from streamagent.events import (
    ApprovalGranted,
    CommandLost,
    DecisionAction,
    DecisionRecorded,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    ToolResult,
    ToolStatus,
    now,
)
from streamagent.signing import CommandKeyError, parse_keys

PIPELINE = parse_keys(TEST_COMMAND_KEYS, "test keys")
CORE = Authenticator(PIPELINE)


def _result(tool: str = "jira", operation: str = "execute") -> ToolResult:
    return ToolResult(
        run_id="r1", command_id="c1", tool=tool, step=tool, operation=operation, status=ToolStatus.succeeded
    )


def _approval(by: str = "grace") -> ApprovalGranted:
    return ApprovalGranted(run_id="r1", request_id="q1", step="email", by=by)


def _signed(role: str, event: object, keys: RoleKeys | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    value = codec.encode(event)  # type: ignore[arg-type]
    signer = keys or issue(PIPELINE, role)
    return value, signer.headers(value)


def _decision() -> DecisionRecorded:
    return DecisionRecorded(
        run_id="r1", decision_id="d1", based_on_version=1, action=DecisionAction.complete, reason="x", decider="t"
    )


@pytest.mark.parametrize(
    ("role", "event"),
    [
        ("decision", _decision()),
        ("decision", RunFailed(run_id="r1", decision_id="d", status="failed", reason="x")),
        ("state", RunDeadlineExceeded(run_id="r1", deadline_at=now())),
        ("state", CommandLost(run_id="r1", command_id="c", step="s", tool="t", redrive=1, evidence="e")),
        ("tool:jira", _result("jira")),
        ("tool:jira", _result("jira", "compensate")),
        ("operator:grace", _approval("grace")),
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_each_component_writes_its_own_events(role: str, event: object) -> None:
    value, headers = _signed(role, event)
    assert CORE.verify(event, value, headers) == role  # type: ignore[arg-type]


def test_a_record_without_the_header_or_with_a_forged_one_is_refused() -> None:
    event = _result()
    value = codec.encode(event)
    with pytest.raises(Unauthenticated, match="no streamagent-auth header"):
        CORE.verify(event, value, None)
    with pytest.raises(Unauthenticated, match="malformed"):
        CORE.verify(event, value, [(authn.HEADER, b"e1:tool:jira:k:nothex")])
    with pytest.raises(Unauthenticated, match="unknown key 'rogue'"):
        CORE.verify(event, value, [(authn.HEADER, f"e1:tool:jira:rogue:{'0' * 64}".encode())])
    # Signed as jira with a key guessed from nothing: same key id, other secret.
    impostor = RoleKeys("tool:jira", parse_keys(f"{PIPELINE.signer.key_id} {'i' * 64}", "impostor"))
    with pytest.raises(Unauthenticated, match="does not match"):
        CORE.verify(event, value, impostor.headers(value))


def test_the_writer_is_read_before_decoding_and_only_the_core_is_trusted() -> None:
    # The fold and the projection verify the header first, to decode a core component's event without
    # validating it again (issue 24); a tool's result (what it reports about the world) is always validated.
    value, headers = _signed("decision", _decision())
    assert CORE.verified_writer(value, headers) == "decision" and "decision" in authn.TRUSTED_WRITERS
    assert CORE.verified_writer(value + b"x", headers) is None  # altered: not trusted, and verify says why
    with pytest.raises(Unauthenticated, match="does not match"):
        CORE.verify(_decision(), value + b"x", headers, CORE.verified_writer(value + b"x", headers))
    result, result_headers = _signed("tool:jira", _result("jira"))
    assert CORE.verified_writer(result, result_headers) == "tool:jira"
    assert not {"tool:jira", "operator:grace"} & authn.TRUSTED_WRITERS
    # The role handed over is still checked against what it may write.
    with pytest.raises(Unauthenticated, match="only decision writes it"):
        CORE.verify(_decision(), result, result_headers, "tool:jira")


def test_an_altered_record_no_longer_verifies() -> None:
    value, headers = _signed("tool:jira", _result())
    altered_event = _result().model_copy(update={"output": {"key": "EVIL"}})
    with pytest.raises(Unauthenticated, match="does not match"):
        CORE.verify(altered_event, codec.encode(altered_event), headers)
    assert CORE.verify(_result(), value, headers) == "tool:jira"


def test_a_tool_key_cannot_answer_for_another_tool_nor_approve_nor_end_a_run() -> None:
    jira = issue(PIPELINE, "tool:jira")
    for event, why in [
        (_result("email"), "result of tool 'email' signed as tool:jira"),
        (_approval(), "only an operator's key answers an approval"),
        (RunFailed(run_id="r1", decision_id="d", status="failed", reason="x"), "only decision writes it"),
        (RunRequested.model_validate(_request()), "only intake writes it"),
    ]:
        value, headers = _signed("", event, jira)
        with pytest.raises(Unauthenticated, match=why):
            CORE.verify(event, value, headers)  # type: ignore[arg-type]
    # Nor can it claim to be another role in the header: the MAC is over the role, under the role's key.
    value = codec.encode(_result("email"))
    forged = jira.headers(value)[0][1].decode().replace("tool:jira", "tool:email").encode()
    with pytest.raises(Unauthenticated, match="does not match"):
        CORE.verify(_result("email"), value, [(authn.HEADER, forged)])


def _child_request() -> RunRequested:
    return RunRequested.model_validate(
        {**_request(), "parent_run_id": "p1", "parent_step": "kyc", "parent_command_id": "c1"}
    )


def test_only_the_decision_processor_starts_a_child_run_and_only_the_state_processor_answers_for_it() -> None:
    """A RunRequested with a parent is the decision processor's (intake's key cannot forge a child), and a
    child workflow step's result (tool ``workflow:<name>``) the state processor's (no tool can answer it)."""
    child = _child_request()
    value, headers = _signed("decision", child)
    assert CORE.verify(child, value, headers) == "decision"
    for role in ("intake", "state", "tool:jira"):
        value, headers = _signed(role, child)
        with pytest.raises(Unauthenticated, match="child run's RunRequested signed as"):
            CORE.verify(child, value, headers)
    # A request without a parent stays intake's.
    plain = RunRequested.model_validate(_request())
    value, headers = _signed("decision", plain)
    with pytest.raises(Unauthenticated, match="only intake writes it"):
        CORE.verify(plain, value, headers)
    answer = _result("workflow:kyc-check")
    value, headers = _signed("state", answer)
    assert CORE.verify(answer, value, headers) == "state"
    for role in ("decision", "tool:jira", "intake"):
        value, headers = _signed(role, answer)
        with pytest.raises(Unauthenticated, match="child workflow 'workflow:kyc-check' signed as"):
            CORE.verify(answer, value, headers)


def test_an_approval_records_the_identity_of_its_key() -> None:
    value, headers = _signed("operator:grace", _approval("mallory"))
    with pytest.raises(Unauthenticated, match="says by 'mallory' but is signed by operator 'grace'"):
        CORE.verify(_approval("mallory"), value, headers)


def test_role_keys_differ_per_role_and_follow_a_rotation() -> None:
    assert tool_keys(PIPELINE, "jira").signer.secret != tool_keys(PIPELINE, "email").signer.secret
    assert tool_keys(PIPELINE, "jira").ids == PIPELINE.ids  # one derived key per pipeline key, same ids
    # Signed under the previous pipeline key (before the rotation): still verifies while it is listed.
    old = parse_keys(" ".join(TEST_OLD_KEY), "old")
    value, headers = _signed("", _result(), issue(old, "tool:jira"))
    assert CORE.verify(_result(), value, headers) == "tool:jira"
    retired = Authenticator(parse_keys(TEST_COMMAND_KEYS.splitlines()[0], "current only"))
    with pytest.raises(Unauthenticated, match="unknown key 'test-previous'"):
        retired.verify(_result(), value, headers)


def test_a_role_key_file_round_trips_and_names_its_role(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "tool-jira.keys"
    issue(PIPELINE, "tool:jira").write(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = read_role_keys(path)
    assert loaded.role == "tool:jira" and loaded.keys == tool_keys(PIPELINE, "jira")
    (tmp_path / "bare.keys").write_text("k1 " + "x" * 64 + "\n")
    with pytest.raises(CommandKeyError, match="names no role"):
        read_role_keys(tmp_path / "bare.keys")
    with pytest.raises(ValueError, match="is not one of"):
        issue(PIPELINE, "admin")


def _request() -> dict[str, object]:
    return {
        "run_id": "r1",
        "company_name": "Acme",
        "company_domain": "acme.io",
        "contact_name": "Ada",
        "contact_email": "ada@acme.io",
        "requested_by": "crm",
    }


class _Recorded:
    """A produced record as a consumer would read it back (the confluent ``Message`` methods used)."""

    def __init__(self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self._topic, self._key, self._value, self._headers = topic, key, value, headers

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 5


def test_a_dead_letter_keeps_the_authentication_so_a_replay_puts_back_a_record_that_verifies() -> None:
    from streamagent.config import Settings
    from streamagent.dlq import DeadLetter, DeadLetterSink

    sent: list[_Recorded] = []

    class Producer:
        def produce(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
            sent.append(_Recorded(topic, key, value, headers))

    value, headers = _signed("tool:jira", _result())
    original = _Recorded("agent.tool.results", b"r1", value, headers)
    DeadLetterSink(Settings(), Producer(), "state").send(original, "processing-error", "a bug, since fixed")  # type: ignore[arg-type]
    letter = DeadLetter.from_message(sent[0])  # type: ignore[arg-type]
    assert letter.reason == "processing-error" and letter.summary()["signed"] is True
    assert CORE.verify(_result(), letter.value, letter.replay_headers()) == "tool:jira"


def test_the_projection_refuses_a_forged_command_for_a_name_no_tool_can_have() -> None:
    """A forged command naming an impossible tool is refused as unauthenticated, not an error to retry."""
    from streamagent.processors.projection.processor import ProjectionHandler

    from streamagent.config import Settings
    from streamagent.events import ToolCommand

    handler = ProjectionHandler(Settings(), steps_of={}, authenticator=CORE)
    forged = ToolCommand(run_id="r1", command_id="c", decision_id="d", tool="Not A Tool!", step="s", deadline_at=now())
    value = codec.encode(forged)
    problem = handler._unauthenticated(forged, _Recorded("agent.tool.commands.x", b"r1", value, []))
    assert problem is not None and "not a tool name" in problem
