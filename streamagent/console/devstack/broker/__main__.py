"""The durable embedded broker, one process: ``python -m streamagent.console.devstack.broker``.

It starts Tansu (memory storage) on a private port, advertising the public address, restores the
journal into it, then serves the public address through the journal proxy. Tansu is our child and
dies with us (PR_SET_PDEATHSIG), and we exit if it dies, so the two are restarted as one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from streamagent.config import child_environ
from streamagent.console.devstack.broker import wire
from streamagent.console.devstack.broker.journal import (
    JOURNAL_FILE,
    JournalInUse,
    JournalWriter,
    lock_journal,
    rewrite,
    scan,
)
from streamagent.console.devstack.broker.proxy import GroupCommit, JournalProxy
from streamagent.console.devstack.broker.restore import restore

log = logging.getLogger("streamagent.console.devstack.broker")

READY_LINE = "journal broker ready"


def _die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs the child when this process dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(wire.encode_request(wire.API_VERSIONS, 0, 1, "probe", b""))
            return len(sock.recv(4)) == 4
    except OSError:
        return False


def _spawn_tansu(binary: str, host: str, port: int, advertised: str, log_path: Path) -> subprocess.Popen[bytes]:
    handle = log_path.open("ab")
    return subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{host}:{port}",
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=child_environ(NO_COLOR="1"),
        preexec_fn=_die_with_parent,  # safe: this process starts no thread before tansu
    )


async def _serve(args: argparse.Namespace) -> int:
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    host, _, port_text = args.listen.rpartition(":")
    public_port = int(port_text)
    journal_path = data / JOURNAL_FILE
    try:
        # Before the journal is read: held until this process exits (the kernel releases it then).
        lock_journal(data)
    except JournalInUse as exc:
        print(exc, file=sys.stderr, flush=True)
        return 6

    started = time.monotonic()
    entries, clean_length = scan(journal_path)
    private_port = _free_port(host)
    tansu = _spawn_tansu(args.tansu, host, private_port, f"tcp://{host}:{public_port}", data / "tansu.log")
    deadline = time.monotonic() + 20
    while not _answers(host, private_port):
        if tansu.poll() is not None or time.monotonic() > deadline:
            tail = (data / "tansu.log").read_bytes()[-2000:].decode("utf-8", errors="replace")
            print(f"tansu did not start (exit {tansu.poll()}); {data / 'tansu.log'} ends:\n{tail}", file=sys.stderr)
            tansu.kill()
            return 1
        await asyncio.sleep(0.02)  # readiness probe interval
    report = restore(entries, host, private_port)
    for gap in report.gaps:
        log.warning("restore: %s (a batch never acknowledged left a hole; offsets moved down)", gap)
    if report.gaps:
        # New entries will carry the broker's new offsets: the journal must speak the same numbering.
        clean_length = rewrite(journal_path, report.rewritten, fsync=args.fsync)
        log.warning("journal rewritten in the restored numbering: %d entries", len(report.rewritten))
    commit = GroupCommit(JournalWriter(journal_path, clean_length=clean_length, fsync=args.fsync))
    proxy = JournalProxy((host, public_port), (host, private_port), commit)
    try:
        await proxy.start()
    except OSError as exc:
        print(f"cannot listen on {args.listen}: {exc}", file=sys.stderr)
        tansu.kill()
        return 3
    log.info(
        "%s on %s: restored %d batches (%d bytes), %d group offsets, %d admin requests, %d holes in %.2fs",
        READY_LINE,
        args.listen,
        report.batches,
        report.records_bytes,
        report.offsets,
        report.admin_requests,
        len(report.gaps),
        time.monotonic() - started,
    )
    print(f"{READY_LINE} {args.listen}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(proxy.serve_forever())
    tansu_exit = loop.run_in_executor(None, tansu.wait)
    stopping = asyncio.create_task(stop.wait())
    journal_failed = asyncio.create_task(commit.failed.wait())
    await asyncio.wait([serving, tansu_exit, stopping, journal_failed], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if tansu_exit.done():
        log.error("tansu exited with %s; the journal broker stops so that both restart", tansu.returncode)
        code = 4
    if journal_failed.done():
        code = 5
    proxy.close()
    for task in (stopping, journal_failed):
        task.cancel()
    log.info("requests forwarded by api key: %s; journal syncs: %d", proxy.requests, commit.syncs)
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    commit.close()
    if tansu.poll() is None:
        tansu.terminate()
        try:
            await asyncio.wait_for(tansu_exit, 2)
        except TimeoutError:
            tansu.kill()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamagent.console.devstack.broker", description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port clients connect to")
    parser.add_argument("--data-dir", required=True, help="where the journal and tansu's log live")
    parser.add_argument("--tansu", required=True, help="path of the tansu binary")
    parser.add_argument("--no-fsync", dest="fsync", action="store_false", help="survive kill -9, not a power cut")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop  # faust-streaming's optional event loop: the proxy's per-frame cost roughly halves
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
