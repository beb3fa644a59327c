"""Every shell example marked runnable in the README and the docs site, run against a real stack.

One stack for the whole file (the session's broker and PostgreSQL, the processors, the tools and the
sandbox as ``up`` runs them), one completed run whose id the blocks get as ``$RUN_ID``, then each block
through ``bash -e -o pipefail`` with the real ``streamagent`` entry point first on ``PATH``, in a scratch
directory of its own, one after the other in the order of the files (a replay block, say, compares the
whole log with the live state: it must not run beside a block that submits). A block passes when it exits 0; a
failure names the block's file and line and shows its output. How a block is marked:
``tests/unit/docs/markdown_blocks.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from helpers import TEST_APPROVAL_KEYS, TEST_COMMAND_KEYS, ended, eventually
from pydantic import SecretStr
from unit.docs.markdown_blocks import Block, runnable_blocks

from streamagent.config import Settings, child_environ
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.embedded import EmbeddedPostgres
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

BLOCKS = runnable_blocks()
# The directory of the interpreter running the tests holds the `streamagent` script pip installed.
BIN = Path(sys.executable).parent


def test_the_docs_have_runnable_examples() -> None:
    assert BLOCKS, "no block is marked <!-- runnable --> in README.md or docs/: the examples would go unchecked"
    assert any(b.path.name == "README.md" for b in BLOCKS), "the README's own examples are not marked runnable"


def _own_database(infra: dict[str, object], name: str) -> str:
    """A database of its own for this file's stack, as the ``settings`` fixture makes one per test."""
    postgres = infra["postgres"]
    if isinstance(postgres, EmbeddedPostgres):
        return postgres.create_database(name)
    import psycopg

    base = str(infra["database_url"])
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    infra["created"].databases.append(name)  # type: ignore[attr-defined]
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def stack_env(infra: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment a block runs in: the running stack's settings, ``RUN_ID``, and ``PATH``."""
    assert (BIN / "streamagent").exists(), f"no streamagent entry point beside {sys.executable}"
    tag = uuid.uuid4().hex[:10]
    prefix = f"t{tag}."
    infra["created"].prefixes.append(prefix)  # type: ignore[attr-defined]
    settings = Settings(
        bootstrap_servers=str(infra["bootstrap"]),
        database_url=_own_database(infra, f"t_{tag}"),
        topic_prefix=prefix,
        partitions=4,
        data_dir=tmp_path_factory.mktemp("docs-stack") / "data",
        log_format="json",
        command_keys=SecretStr(TEST_COMMAND_KEYS),
        approval_keys=SecretStr(TEST_APPROVAL_KEYS),
    )
    with Stack(settings) as stack:
        s = stack.settings
        request = sample_requests(1)[0]
        produce_requests(s, [request])
        rows = eventually(lambda: ended(s, [request.run_id]), timeout=90, what="the docs stack's first run ended")
        assert rows[0].status == "completed", rows[0].reason
        env = child_environ(s, RUN_ID=request.run_id, NO_COLOR="1")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        yield env


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_runnable_example(block: Block, stack_env: dict[str, str], tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None, "bash is needed to run the documentation's examples"
    started = time.monotonic()
    done = subprocess.run(
        [bash, "-e", "-o", "pipefail", "-c", block.code],
        cwd=tmp_path,
        env=stack_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (
        f"{block.where}: the example exited {done.returncode} after {time.monotonic() - started:.1f}s\n"
        f"{block.code}--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    )
