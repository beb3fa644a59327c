"""The journal proxy's promise: a producer hears "acknowledged" only once its records are in the journal.

A real Tansu broker behind the proxy; the journal's write is held open by the test, and the produce
answer must wait for it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from confluent_kafka.admin import AdminClient, NewTopic

from streamagent.console.devstack.broker import wire
from streamagent.console.devstack.broker.journal import JournalWriter, Records, scan
from streamagent.console.devstack.broker.proxy import GroupCommit, JournalProxy
from streamagent.console.devstack.broker.restore import _Connection
from streamagent.console.devstack.embedded import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration


class _GatedWriter(JournalWriter):
    """A journal whose writes wait for the test to open the gate (a slow disk, made controllable)."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(path, fsync=False)
        self.gate = gate

    def write(self, data: bytes) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        super().write(data)


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(tmp_path / "tansu", storage="memory").start()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    for future in admin.create_topics([NewTopic("held", 1, 1)]).values():
        future.result()
    yield broker
    broker.stop()


def _serve(proxy: JournalProxy, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.run_until_complete(proxy.start())
    ready.set()
    loop.run_forever()


def _batch() -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 16,
    )
    builder.append(0, timestamp=1_700_000_000_000, key=b"k", value=b"v", headers=[])
    return bytes(builder.build())


def test_a_produce_answer_waits_for_the_journal(tansu: EmbeddedBroker, tmp_path: Path) -> None:
    gate = threading.Event()
    journal = tmp_path / "journal.log"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = free_port()
    proxy = JournalProxy(("127.0.0.1", port), ("127.0.0.1", tansu.port), GroupCommit(_GatedWriter(journal, gate)))
    thread = threading.Thread(target=_serve, args=(proxy, loop, ready), daemon=True)
    thread.start()
    assert ready.wait(10)
    conn = _Connection("127.0.0.1", port, timeout_s=30)
    try:
        batch = _batch()
        conn.send(wire.PRODUCE, 3, wire.encode_produce_request("held", 0, batch))
        conn.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            conn.receive()  # the broker has answered, but the journal write is still held
        assert scan(journal)[0] == []
        gate.set()
        conn.sock.settimeout(30)
        _, frame = conn.receive()
        assert wire.parse_produce_response(frame[4:], 3) == {("held", 0): (0, 0)}
        assert scan(journal)[0] == [Records("held", 0, 0, batch)]
    finally:
        gate.set()
        conn.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
