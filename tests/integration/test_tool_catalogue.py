"""The live tool catalogue on the real broker: tools as OS processes announce, heartbeat and leave."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import eventually, read_topic

from streamagent.catalogue import Announcement, Catalogue, decode
from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.devstack.stack import Stack
from streamagent.dlq import DeadLetterSink
from streamagent.kafka import producer as make_producer
from streamagent.topics import TOOL_REGISTRY

pytestmark = pytest.mark.integration


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    # A short heartbeat (lease 3 s) so that a lapsed lease shows within seconds.
    settings = settings.model_copy(update={"registry_heartbeat_s": 1.0})
    for key, value in to_env(settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def listed(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert cli(["tools", "--json"]) == 0
    return {t["name"]: t for t in json.loads(capsys.readouterr().out)}


def last_announcement(s: Settings, tool: str) -> Announcement:
    member = f"{tool}/{s.topic_prefix}tool-{tool}".encode()
    found = [decode(m.key(), m.value()) for m in read_topic(s, s.topic(TOOL_REGISTRY)) if m.key() == member]
    assert found and found[-1] is not None
    return found[-1]


def test_tools_lists_the_live_catalogue_and_a_stopped_tool_becomes_unavailable(
    env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with Stack(env, processors=()) as stack:

        def all_available() -> dict[str, dict[str, Any]] | None:
            tools = listed(capsys)
            ok = set(tools) == set(stack.tools) and all(t["status"] == "available" for t in tools.values())
            return tools if ok else None

        tools = eventually(all_available, timeout=60, interval=0.3, what="the four tools available")
        for name, tool in tools.items():
            assert [m["member_id"] for m in tool["members"]] == [f"{env.topic_prefix}tool-{name}"]
            assert tool["input_schema"]["type"] == "object" and tool["version"] == "1"
            assert tool["requires_approval"] is False
        assert set(tools["enrich"]["input_schema"]["properties"]) == {"domain"}

        # A registry message that does not decode: refused with its reason, the last good entry kept;
        # a catalogue given a dead-letter sink dead-letters it.
        registry = env.topic(TOOL_REGISTRY)
        producer = make_producer(env)
        producer.produce(registry, key=f"enrich/{env.topic_prefix}tool-enrich".encode(), value=b"{not json")
        producer.flush(10)
        with Catalogue(env, dead_letters=DeadLetterSink(env, producer, "catalogue")) as catalogue:
            assert [r[2] for r in catalogue.load().rejected] == ["not-json"]
            assert catalogue.available("enrich") is not None
        producer.flush(10)
        assert listed(capsys)["enrich"]["status"] == "available"
        assert cli(["dlq", "list", "--json"]) == 0
        letters = json.loads(capsys.readouterr().out)
        assert [(x["reason"], x["source_topic"], x["processor"]) for x in letters] == [
            ("not-json", registry, "catalogue")
        ]

        capsys.readouterr()
        assert cli(["tools"]) == 0
        out = capsys.readouterr()
        assert "enrich" in out.out and "available" in out.out and "domain: string" in out.out
        assert "not readable (not-json)" in out.err

        # A graceful stop announces leaving: unavailable without waiting for the lease.
        stack.undeploy("tool-slack")
        eventually(lambda: listed(capsys)["slack"]["status"] == "unavailable", timeout=30, what="slack left")
        assert last_announcement(env, "slack").state == "left"

        # A crash announces nothing: the member stays until its lease (3 heartbeats) lapses.
        stack.undeploy("tool-email", signal.SIGKILL)
        assert last_announcement(env, "email").state == "up"  # no leave on the topic: only the lease ends it
        email = eventually(
            lambda: (t := listed(capsys)["email"])["status"] == "unavailable" and t, timeout=30, what="email's lease"
        )
        assert email["members"] == [] and email["input_schema"]["required"] == ["to", "subject", "body"]
        tools = listed(capsys)
        assert {n for n, t in tools.items() if t["status"] == "available"} == {"enrich", "jira", "draft"}
