"""What starting `streamagent up` costs in CPU, with and without the dev stack's fork server.

Starts `up` on a fresh data dir (its own broker, PostgreSQL, sandbox, processors and tools), waits until
it prints that it is ready and then ``--idle-s`` more (the processes finish importing and join their
groups), and reads the CPU each process spent from /proc, grouped as the broker, PostgreSQL, the fork
server and the stack's own processes. Alternates ``STREAMAGENT_STACK_PREFORK`` true and false.

    .venv/bin/python bench/stack_start.py --rounds 2

Prints a human table, then one line of pure JSON per start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

READY = "Ctrl-C stops everything"


def cpu_s(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def kind(proc: psutil.Process) -> str:
    try:
        line = " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return "gone"
    if "devstack.prefork" in line:
        return "fork_server"
    if "streamagent.console.cli" in line:
        return "stack"
    return "postgres" if "postgres" in line else "broker"


def start_once(prefork: bool, idle_s: float) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="stack-start-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGENT_")}
    free = {"STREAMAGENT_UI_PORT": "0", "STREAMAGENT_BROKER_PORT": "0", "STREAMAGENT_SANDBOX_PORT": "0"}
    env.update(free, STREAMAGENT_DATA_DIR=str(base / "data"), STREAMAGENT_STACK_PREFORK=str(prefork).lower())
    out_path = base / "up.out"
    began = time.monotonic()
    with out_path.open("w") as out:
        up = subprocess.Popen([sys.executable, "-m", "streamagent.console.cli", "up"], env=env, stdout=out, stderr=out)
    try:
        while READY not in out_path.read_text():
            if up.poll() is not None:
                raise SystemExit(f"up exited {up.returncode}: {out_path.read_text()}")
            time.sleep(0.1)
        ready_s = time.monotonic() - began
        time.sleep(idle_s)
        spent: dict[str, float] = {}
        processes = psutil.Process(up.pid).children(recursive=True)
        for proc in processes:
            spent[kind(proc)] = spent.get(kind(proc), 0.0) + cpu_s(proc)
        stack_processes = sum(1 for p in processes if kind(p) == "stack")
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(120)
    return {
        "bench": "stack_start",
        "prefork": prefork,
        "ready_s": round(ready_s, 2),
        "idle_s": idle_s,
        "stack_processes": stack_processes,
        "stack_cpu_s": round(spent.get("stack", 0.0), 2),
        "fork_server_cpu_s": round(spent.get("fork_server", 0.0), 2),
        "broker_cpu_s": round(spent.get("broker", 0.0), 2),
        "load_1m": round(os.getloadavg()[0], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="starts of each kind, alternating")
    parser.add_argument("--idle-s", type=float, default=15.0, help="seconds after ready before reading CPU")
    args = parser.parse_args(argv)
    results = [start_once(prefork, args.idle_s) for _ in range(args.rounds) for prefork in (True, False)]
    print(f"{'prefork':>8} {'ready s':>8} {'procs':>6} {'stack cpu s':>12} {'server cpu s':>13} {'load':>5}")
    for r in results:
        print(
            f"{r['prefork']!s:>8} {r['ready_s']:>8} {r['stack_processes']:>6} {r['stack_cpu_s']:>12}"
            f" {r['fork_server_cpu_s']:>13} {r['load_1m']:>5}"
        )
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
