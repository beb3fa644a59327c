"""Serve a local GGUF model with llama-cpp-python's OpenAI-compatible server around one command.

What ``make demo-llm-local`` and ``make bench-llm-local`` run: start ``python -m llama_cpp.server`` (from
the venv ``make llm-local`` built) on a free port, wait until ``GET /v1/models`` answers, run the command
with ``OPENAI_BASE_URL`` pointing at it (``{url}`` in the command is replaced by the same URL), then stop
the server, whatever the command did. Exit status: the command's; 1 when the server did not come up.

    python bench/local_model.py --python ~/.cache/streamagent/llm-venv/bin/python --model model.gguf \\
        -- python -m streamagent.console.demo_llm
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from streamagent.console.devstack.embedded import free_port

READY_TIMEOUT_S = 180.0  # loading a small model takes seconds; a machine under load, more


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="the interpreter of the venv holding llama_cpp")
    parser.add_argument("--model", required=True, type=Path, help="the GGUF weights")
    parser.add_argument("--ctx", type=int, default=8192, help="context window in tokens (n_ctx)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (n_threads)")
    parser.add_argument("--chat-format", default="", help="llama_cpp chat format (default: the GGUF's template)")
    parser.add_argument("--log", type=Path, default=Path("llama-server.log"), help="where the server's output goes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run against the server")
    args = parser.parse_args(argv)
    args.command = [a for a in args.command if a != "--"] if args.command[:1] == ["--"] else args.command
    if not args.command:
        parser.error("give the command to run after --")
    if not args.model.is_file():
        parser.error(f"no weights at {args.model} (make llm-local builds them into the cache)")
    return args


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True once ``/v1/models`` answers; False when the server exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            httpx.get(f"{url}/models", timeout=2).raise_for_status()
            return True
        except httpx.HTTPError:
            time.sleep(0.5)  # readiness probe interval
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server_cmd = [args.python, "-m", "llama_cpp.server", "--model", str(args.model), "--host", "127.0.0.1"]
    server_cmd += ["--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", str(args.threads)]
    if args.chat_format:
        server_cmd += ["--chat_format", args.chat_format]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("wb") as log:
        server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        if not wait_ready(url, server, READY_TIMEOUT_S):
            print(f"the model server did not come up; its log ({args.log}):", file=sys.stderr)
            print("\n".join(args.log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            return 1
        ready = time.monotonic() - started
        print(f"llama_cpp.server (pid {server.pid}) ready at {url} in {ready:.1f} s; log {args.log}")
        chat = args.chat_format or "the GGUF template"
        print(f"model {args.model.name}, n_ctx {args.ctx}, n_threads {args.threads}, chat format {chat}", flush=True)
        command = [part.replace("{url}", url) for part in args.command]
        os.environ["OPENAI_BASE_URL"] = url
        return subprocess.run(command, check=False).returncode
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


if __name__ == "__main__":
    sys.exit(main())
