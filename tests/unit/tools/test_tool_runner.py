"""The tool runner's hot path against a real PostgreSQL (and, for the runner itself, the real broker).

The batched claim: one round trip claims a batch's ledger rows, reading no other layer's table. The
group commit: concurrent writes become few statements, and each writer resumes only once its write is
durable. The runner: every command's signature verified before anything else (an unauthenticated one
dead-lettered with no effect), one claim round trip per consumed batch, with every guarantee of the
slow path (dedupe, dead letters, run order, retries, idempotency key, commits after the effects).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from helpers import TEST_OLD_KEY, eventually, read_topic, record_decision
from pydantic import BaseModel, SecretStr
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.tools.sdk import CallContext, PermanentError, RetryableError, RetryPolicy, Tool
from streamagent.tools.sdk.ledger import CLAIM_SQL, ClaimRequest, Ledger, LedgerWriter, Stopping
from streamagent.tools.sdk.runner import ToolRunner
from streamagent.tools.sdk.schema import SCHEMA as LEDGER_SCHEMA

from streamagent import codec, db
from streamagent.authn import tool_keys
from streamagent.config import Settings
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import ToolCommand, ToolResult, ToolStatus, now
from streamagent.kafka import admin, create_topics, group_offsets
from streamagent.signing import load_keys, parse_keys, sign
from streamagent.topics import TOOL_RESULTS, command_topic

STEP = "enrich"


def _rows(settings: Settings) -> dict[str, tuple[str, int, bytes | None]]:
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT command_id, status, attempts, result_event FROM tool_ledger").fetchall()
    return {c: (s, a, bytes(r) if r is not None else None) for c, s, a, r in rows}


def _request(i: int, claim: bool = True, step: str = STEP) -> ClaimRequest:
    return ClaimRequest(f"cmd-{i}", f"run-{i}", step, claim)


# -- the batched claim -----------------------------------------------------------------------------------
def test_one_round_trip_claims_the_whole_batch_without_reading_the_decision_layer(settings: Settings) -> None:
    db.migrate(settings, LEDGER_SCHEMA)
    # The tools' ledger stands on its own: whether a command came from the pipeline is its signature's
    # business (checked before the claim), so the decision layer's table may as well not exist.
    assert "decisions" not in CLAIM_SQL
    with db.connect(settings) as conn:  # only the ledger's own table exists
        assert conn.execute("SELECT to_regclass('decisions')").fetchone() == (None,)
    requests = [_request(i) for i in range(40)]

    async def go() -> list[Any]:
        ledger = await Ledger.open(settings)
        try:
            claims = await ledger.claim("enrich", requests)
            assert ledger.round_trips == 1 and ledger.round_trips_by == {"claim": 1}
            return claims
        finally:
            await ledger.close()

    claims = asyncio.run(go())
    assert len(claims) == len(requests)
    for claimed in claims:
        assert not isinstance(claimed, Exception) and claimed.entry is not None
        assert (claimed.entry.status, claimed.entry.attempts, claimed.entry.result_event) == ("running", 1, None)
        assert not claimed.entry.final
    rows = _rows(settings)
    assert set(rows) == {f"cmd-{i}" for i in range(40)}
    assert set(rows.values()) == {("running", 1, None)}


def test_a_final_row_comes_back_with_its_result_and_an_unfinished_one_counts_an_attempt(settings: Settings) -> None:
    db.migrate(settings, LEDGER_SCHEMA)
    with db.connect(settings) as conn:
        conn.execute(
            "INSERT INTO tool_ledger (command_id, tool, run_id, step, status, attempts, result_event) VALUES"
            " ('cmd-0', 'enrich', 'run-0', 'enrich', 'succeeded', 3, '\\xc301beef'),"
            " ('cmd-1', 'enrich', 'run-1', 'enrich', 'failed', 1, '\\xc301dead'),"
            " ('cmd-2', 'enrich', 'run-2', 'enrich', 'running', 2, NULL)"  # its owner died mid-call
        )

    async def go() -> list[Any]:
        ledger = await Ledger.open(settings)
        try:
            claims = await ledger.claim("enrich", [_request(i) for i in range(4)])
            assert ledger.round_trips == 1
            return claims
        finally:
            await ledger.close()

    done, failed, resumed, fresh = (c.entry for c in asyncio.run(go()))
    assert done.final and (done.status, done.attempts, done.result_event) == ("succeeded", 3, b"\xc3\x01\xbe\xef")
    assert failed.final and (failed.status, failed.result_event) == ("failed", b"\xc3\x01\xde\xad")
    assert (resumed.status, resumed.attempts) == ("running", 3)
    assert (fresh.status, fresh.attempts) == ("running", 1)
    rows = _rows(settings)
    assert rows["cmd-0"] == ("succeeded", 3, b"\xc3\x01\xbe\xef")  # a final row is left as it was
    assert rows["cmd-1"] == ("failed", 1, b"\xc3\x01\xde\xad")


def test_an_unclaimed_request_leaves_its_row_alone(settings: Settings) -> None:
    db.migrate(settings, LEDGER_SCHEMA)

    async def go() -> list[Any]:
        ledger = await Ledger.open(settings)
        try:
            return await ledger.claim("enrich", [_request(0, claim=False), _request(1, claim=False)])
        finally:
            await ledger.close()

    first, second = asyncio.run(go())
    assert first.entry is None and second.entry is None
    assert _rows(settings) == {}


def test_a_command_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_claimed(settings: Settings) -> None:
    db.migrate(settings, LEDGER_SCHEMA)
    requests = [_request(i, step="bad\x00step" if i == 2 else STEP) for i in range(5)]

    async def go() -> list[Any]:
        ledger = await Ledger.open(settings)
        try:
            return await ledger.claim("enrich", requests)
        finally:
            await ledger.close()

    claims = asyncio.run(go())
    assert isinstance(claims[2], psycopg.DataError)
    assert all(c.entry is not None and c.entry.status == "running" for i, c in enumerate(claims) if i != 2)
    assert set(_rows(settings)) == {"cmd-0", "cmd-1", "cmd-3", "cmd-4"}


def test_a_lost_connection_is_retried_not_reported(settings: Settings) -> None:
    db.migrate(settings, LEDGER_SCHEMA)

    async def go() -> None:
        ledger = await Ledger.open(settings)
        try:
            assert ledger.conn is not None
            pid = ledger.conn.info.backend_pid
            with db.connect(settings) as admin_conn:
                admin_conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            (claimed,) = await ledger.claim("enrich", [_request(0)])
            assert not isinstance(claimed, Exception) and claimed.entry is not None
            assert claimed.entry.status == "running"
            assert ledger.round_trips_by["claim"] == 2  # the one that met the dead connection, and its retry
        finally:
            await ledger.close()

    asyncio.run(go())


def test_retrying_an_unreachable_database_ends_when_the_tool_stops() -> None:
    async def go() -> None:
        stop = asyncio.Event()
        ledger = Ledger("postgresql://nobody@127.0.0.1:1/nothing", stop=stop, retry=RetryPolicy(initial_s=0.01))
        claim = asyncio.create_task(ledger.claim("enrich", [_request(0)]))
        deadline = time.monotonic() + 10
        while ledger.round_trips < 3:  # it keeps trying: a database outage is not the command's fault
            assert time.monotonic() < deadline and not claim.done()
            await asyncio.sleep(0.01)  # poll interval
        stop.set()
        with pytest.raises(Stopping):
            await asyncio.wait_for(claim, timeout=5)

    asyncio.run(go())


# -- the group commit --------------------------------------------------------------------------------------
def _claimed(settings: Settings, n: int) -> None:
    db.migrate(settings, LEDGER_SCHEMA)

    async def go() -> None:
        ledger = await Ledger.open(settings)
        try:
            await ledger.claim("enrich", [_request(i) for i in range(n)])
        finally:
            await ledger.close()

    asyncio.run(go())


@pytest.mark.parametrize(("max_batch", "flushes_per_round"), [(500, 1), (50, 4)])
def test_concurrent_writes_are_group_committed_and_each_writer_resumes_once_durable(
    settings: Settings, max_batch: int, flushes_per_round: int
) -> None:
    n = 200
    _claimed(settings, n)

    async def go() -> tuple[int, int, int]:
        ledger = await Ledger.open(settings)
        writer = LedgerWriter(ledger, max_batch=max_batch)
        probe = await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True)

        async def durable(command_id: str) -> tuple[str, int, bytes | None]:
            cur = await probe.execute(
                "SELECT status, attempts, result_event FROM tool_ledger WHERE command_id = %s", (command_id,)
            )
            row = await cur.fetchone()
            assert row is not None
            return row[0], row[1], bytes(row[2]) if row[2] is not None else None

        async def attempt(i: int) -> None:
            await writer.attempt(f"cmd-{i}")
            assert await durable(f"cmd-{i}") == ("running", 2, None)  # another connection sees it: committed

        async def finish(i: int) -> None:
            status, result = "succeeded" if i % 2 else "failed", f"result-{i}".encode()
            await writer.finish(f"cmd-{i}", status, result)
            assert await durable(f"cmd-{i}") == (status, 2, result)

        try:
            await asyncio.gather(*(attempt(i) for i in range(n)))
            assert writer.flushes == flushes_per_round
            await asyncio.gather(*(finish(i) for i in range(n)))
            return ledger.round_trips, ledger.round_trips_by["write"], writer.flushes
        finally:
            await writer.close()
            await probe.close()
            await ledger.close()

    round_trips, writes, flushes = asyncio.run(go())
    # 400 writes (an attempt and a finish for each of 200 commands) in a handful of statements.
    # (max_batch commands at most per statement).
    assert round_trips == writes == flushes == 2 * flushes_per_round
    rows = _rows(settings)
    assert rows == {f"cmd-{i}": ("succeeded" if i % 2 else "failed", 2, f"result-{i}".encode()) for i in range(n)}


def test_writes_of_one_command_in_one_flush_are_merged(settings: Settings) -> None:
    _claimed(settings, 1)

    async def go() -> int:
        ledger = await Ledger.open(settings)
        writer = LedgerWriter(ledger)
        try:
            await asyncio.gather(writer.attempt("cmd-0"), writer.attempt("cmd-0"), writer.finish("cmd-0", "x", b"r"))
            return writer.flushes
        finally:
            await writer.close()
            await ledger.close()

    assert asyncio.run(go()) == 1
    assert _rows(settings)["cmd-0"] == ("x", 3, b"r")


def test_a_write_the_database_refuses_fails_alone(settings: Settings) -> None:
    _claimed(settings, 4)

    async def go() -> list[BaseException | None]:
        ledger = await Ledger.open(settings)
        writer = LedgerWriter(ledger)
        try:
            return await asyncio.gather(
                *(writer.finish(f"cmd-{i}", "bad\x00" if i == 1 else "succeeded", b"r") for i in range(4)),
                return_exceptions=True,
            )
        finally:
            await writer.close()
            await ledger.close()

    outcomes = asyncio.run(go())
    assert isinstance(outcomes[1], psycopg.DataError)
    assert [o for i, o in enumerate(outcomes) if i != 1] == [None, None, None]
    rows = _rows(settings)
    assert {c: s for c, (s, _, _) in rows.items()} == {
        "cmd-0": "succeeded",
        "cmd-1": "running",
        "cmd-2": "succeeded",
        "cmd-3": "succeeded",
    }


# -- the runner, on the real broker --------------------------------------------------------------------------
class Numbers(BaseModel):
    n: int


class Flaky(Tool[Numbers, Numbers]):
    """An ``enrich`` that needs no HTTP: n < 0 fails once retryably, n == 13 is refused permanently."""

    name = "enrich"
    description = "test double"
    input_model = Numbers
    output_model = Numbers
    retry = RetryPolicy(initial_s=0.01, max_backoff_s=0.05)

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int]] = []
        self.running: Counter[str] = Counter()
        self.overlaps = 0
        self.failed_once: set[str] = set()

    async def call(self, args: Numbers, ctx: CallContext) -> Numbers:
        self.calls.append((ctx.run_id, ctx.command_id, ctx.headers["Idempotency-Key"], ctx.attempt))
        self.running[ctx.run_id] += 1
        self.overlaps += self.running[ctx.run_id] > 1
        try:
            await asyncio.sleep(random.uniform(0, 0.02))  # the API's latency, so that commands interleave
        finally:
            self.running[ctx.run_id] -= 1
        if args.n < 0 and ctx.command_id not in self.failed_once:
            self.failed_once.add(ctx.command_id)
            raise RetryableError("503 once")
        if args.n == 13:
            raise PermanentError("400 thirteen")
        return Numbers(n=args.n * 2)


def _command(run_id: str, step: str, n: int, decision_id: str = "d", tool: str = "enrich") -> ToolCommand:
    return ToolCommand(
        run_id=run_id,
        command_id=f"{run_id}-{step}",
        decision_id=decision_id,
        tool=tool,
        step=step,
        arguments={"n": n},
        deadline_at=now() + timedelta(seconds=60),
    )


@pytest.mark.integration
def test_the_runner_claims_once_per_batch_and_keeps_every_guarantee(settings: Settings, tmp_path: Path) -> None:
    db.migrate(settings, LEDGER_SCHEMA, DECISION_SCHEMA)  # a tool reads the decisions (stale commands)
    # Keys from a two-key file, as after a rotation: the first signs, the second (the old one) still verifies.
    keys_file = tmp_path / "command-keys"
    keys_file.write_text(settings.command_keys.get_secret_value() + "\n")
    keys_file.chmod(0o600)
    settings = settings.model_copy(update={"command_keys": SecretStr(""), "command_keys_file": keys_file})
    keys = load_keys(settings)
    assert len(keys.keys) == 2 and keys.ids[1] == TEST_OLD_KEY[0]
    keys = tool_keys(keys, "enrich")  # the decision processor signs a tool's commands with that tool's key
    create_topics(settings)
    topic = settings.topic(command_topic("enrich"))
    recorded = codec.encode(
        ToolResult(run_id="run-done", command_id="run-done-s0", tool="enrich", step="s0", status=ToolStatus.succeeded)
    )
    with db.connect(settings) as conn:
        conn.execute(
            "INSERT INTO tool_ledger (command_id, tool, run_id, step, status, attempts, result_event)"
            " VALUES ('run-done-s0', 'enrich', 'run-done', 's0', 'succeeded', 1, %s)",
            (recorded,),
        )
    runs = [f"run-{i}" for i in range(12)]
    commands = [sign(_command(run, f"s{step}", -1 if (i, step) == (3, 1) else 13 if (i, step) == (5, 2) else i), keys)
                for step in range(3) for i, run in enumerate(runs)]  # fmt: skip
    old_key = tool_keys(parse_keys(" ".join(TEST_OLD_KEY), "the old key"), "enrich")
    commands.append(sign(_command("run-old-key", "s0", 21), old_key))  # signed before the rotation: accepted
    commands.append(sign(_command("run-done", "s0", 1), keys))  # already done: its recorded result is republished
    commands.append(sign(_command("run-0", "s0", 0), keys))  # a redelivery of a command: run once, published twice
    # Not from the pipeline: no signature, a key this tool does not know, a known key id with another
    # secret, and a real command whose arguments were changed after it was signed.
    rogue = parse_keys(f"rogue {'r' * 64}", "rogue")
    impostor = parse_keys(f"{keys.signer.key_id} {'i' * 64}", "impostor")
    forged = [
        _command("run-unsigned", "s0", 1),
        sign(_command("run-rogue", "s0", 1), rogue),
        sign(_command("run-impostor", "s0", 1), impostor),
        sign(_command("run-altered", "s0", 1), keys).model_copy(update={"arguments": {"n": 1000}}),
    ]
    for run_id in {c.run_id for c in commands}:
        record_decision(settings, run_id, 0, "d")  # every command's decision, as the decision processor records it
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for command in commands:
        producer.produce(topic, key=command.run_id.encode(), value=codec.encode(command))
    producer.produce(topic, key=b"x", value=b"\x00garbage")
    for command in forged:
        producer.produce(topic, key=command.run_id.encode(), value=codec.encode(command))
    producer.produce(topic, key=b"x", value=codec.encode(sign(_command("run-other", "s0", 1, tool="jira"), keys)))
    assert producer.flush(10) == 0

    tool = Flaky()
    runner = ToolRunner(settings, tool)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(runner.run(),), daemon=True)
    thread.start()
    try:
        results_topic = settings.topic(TOOL_RESULTS)

        def results() -> list[ToolResult] | None:
            got = [codec.decode(m.value()) for m in read_topic(settings, results_topic)]
            return got if len(got) >= len(commands) else None

        published = eventually(results, timeout=60, what="every command's result")
        letters = eventually(lambda: (lambda got: got if len(got) >= 6 else None)(read_dead_letters(settings)))
        ends = {m.partition(): m.offset() + 1 for m in read_topic(settings, topic)}
        group = settings.group("tool.enrich")

        def committed() -> dict[int, int] | None:
            offsets = group_offsets(admin(settings), group, [(topic, p) for p in range(settings.partitions)])
            got = {p: o for (_t, p), o in offsets.items() if o >= 0}
            return got if got == ends else None

        eventually(committed, timeout=30, what="offsets committed past every command")
    finally:
        loop.call_soon_threadsafe(runner.stop)
        thread.join(30)
    assert not thread.is_alive()

    assert len(published) == len(commands)
    per_command = Counter(r.command_id for r in published)
    assert per_command["run-0-s0"] == 2 and per_command["run-done-s0"] == 1
    assert set(per_command) == {c.command_id for c in commands}
    assert recorded in [codec.encode(r) for r in published]  # the recorded bytes themselves
    by_id = {r.command_id: r for r in published}
    assert by_id["run-5-s2"].status is ToolStatus.failed and by_id["run-5-s2"].error_kind == "permanent"
    assert by_id["run-3-s1"].status is ToolStatus.succeeded and by_id["run-3-s1"].attempts == 2
    assert by_id["run-7-s1"].output == {"n": 14}
    assert by_id["run-old-key-s0"].output == {"n": 42}

    # At most once: one call per fresh command (two for the one retried), under its own idempotency key.
    calls = Counter(cid for _run, cid, _key, _attempt in tool.calls)
    assert calls == {c.command_id: 2 if c.command_id == "run-3-s1" else 1 for c in commands[:-2]}
    assert all(key == cid for _run, cid, key, _attempt in tool.calls)
    # A run's commands one at a time, in order.
    assert tool.overlaps == 0
    order: dict[str, list[str]] = defaultdict(list)
    for run, cid, _key, _attempt in tool.calls:
        if not order[run] or order[run][-1] != cid:
            order[run].append(cid)
    assert order.pop("run-old-key") == ["run-old-key-s0"]
    assert all(steps == [f"{run}-s0", f"{run}-s1", f"{run}-s2"] for run, steps in order.items())

    assert sorted(d.reason for d in letters) == ["not-avro", *["unauthenticated"] * 4, "unexpected-event"]
    # Refused before anything else: no call, no ledger row, no result; each letter says why.
    unauthenticated = {codec.decode(d.value).command_id: d.error for d in letters if d.reason == "unauthenticated"}
    assert set(unauthenticated) == {c.command_id for c in forged}
    assert unauthenticated["run-unsigned-s0"].startswith("unsigned")
    assert unauthenticated["run-rogue-s0"].startswith("signed with unknown key 'rogue'")
    assert unauthenticated["run-impostor-s0"].startswith("signature does not match")
    assert unauthenticated["run-altered-s0"].startswith("signature does not match")
    assert not {cid for _run, cid, _key, _attempt in tool.calls} & set(unauthenticated)
    rows = _rows(settings)
    assert all(rows[c.command_id][0] in ("succeeded", "failed") for c in commands)
    assert rows["run-3-s1"][1] == 2 and rows["run-5-s2"][1] == 1
    assert not set(rows) & set(unauthenticated)

    # The hot path: exactly one admission and one claim round trip per consumed batch, the rest
    # group-committed.
    ledger = runner.ledger
    assert ledger.round_trips_by["admit"] == runner.claimed_batches
    assert ledger.round_trips_by["claim"] == runner.claimed_batches
    assert ledger.round_trips_by["write"] == runner.writer.flushes
    assert ledger.round_trips == 2 * runner.claimed_batches + runner.writer.flushes
    assert ledger.round_trips < len(commands)  # the per-command path made 4 per command


class Held(Flaky):
    """The first call takes ``hold_s`` (a slow API, or a ledger write waiting out an outage)."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s

    async def call(self, args: Numbers, ctx: CallContext) -> Numbers:
        self.calls.append((ctx.run_id, ctx.command_id, ctx.headers["Idempotency-Key"], ctx.attempt))
        if len(self.calls) == 1:
            await asyncio.sleep(self.hold_s)  # the simulated slow call
        return Numbers(n=args.n)


@pytest.mark.integration
def test_a_saturated_runner_keeps_its_place_in_its_group(settings: Settings) -> None:
    """Every slot busy for longer than max.poll.interval.ms: the runner still polls (partitions paused),
    so it is not thrown out of its group; nothing is redelivered and every offset is committed."""
    db.migrate(settings, LEDGER_SCHEMA, DECISION_SCHEMA)
    create_topics(settings)
    topic = settings.topic(command_topic("enrich"))
    commands = [sign(_command(f"run-{i}", "s0", i), tool_keys(load_keys(settings), "enrich")) for i in range(3)]
    for command in commands:
        record_decision(settings, command.run_id, 0, command.decision_id)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for command in commands:
        producer.produce(topic, key=command.run_id.encode(), value=codec.encode(command))
    assert producer.flush(10) == 0
    tool = Held(hold_s=7.0)  # more than twice max.poll.interval.ms below
    poll_limits = {"max.poll.interval.ms": 3000, "session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
    runner = ToolRunner(settings, tool, max_in_flight=1, consumer_config=poll_limits)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(runner.run(),), daemon=True)
    thread.start()
    try:
        results_topic = settings.topic(TOOL_RESULTS)
        eventually(lambda: len(read_topic(settings, results_topic)) >= 3, timeout=60, what="every result")
        ends = {m.partition(): m.offset() + 1 for m in read_topic(settings, topic)}
        group = settings.group("tool.enrich")

        def committed() -> bool:
            offsets = group_offsets(admin(settings), group, [(topic, p) for p in range(settings.partitions)])
            return {p: o for (_t, p), o in offsets.items() if o >= 0} == ends

        eventually(committed, timeout=30, what="offsets committed past every command")
    finally:
        loop.call_soon_threadsafe(runner.stop)
        thread.join(30)
    published = [codec.decode(m.value()) for m in read_topic(settings, settings.topic(TOOL_RESULTS))]
    assert sorted(r.command_id for r in published) == sorted(c.command_id for c in commands)  # none twice
    assert Counter(cid for _run, cid, _key, _attempt in tool.calls) == {c.command_id: 1 for c in commands}


@pytest.mark.integration
def test_commands_that_read_memory_together_share_one_memory_table(settings: Settings) -> None:
    """The first commands that read memory arrive in one batch; each used to start a table of its own when
    none existed yet: consumers that polled the broker for the life of the process."""
    create_topics(settings)
    runner = ToolRunner(settings, Flaky())
    commands = [_command(f"run-{i}", "s0", i).model_copy(update={"memory": {"contact/acme.io": 0}}) for i in range(8)]

    def tables() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "tool-enrich-memory"]

    async def go() -> list[list[str]]:
        return await asyncio.gather(*(runner._memory_changed(c) for c in commands))

    try:
        assert asyncio.run(go()) == [[]] * len(commands)  # memory holds nothing newer than version 0
        assert len(tables()) == 1
    finally:
        if runner._memory is not None:
            runner._memory.stop()
    assert tables() == []
