"""The demo's closing hint names a run so that the command it suggests works when pasted."""

from __future__ import annotations

import shlex
from pathlib import Path

from streamagent.console.demo import timeline_hint

RUN = "0f6c2a9e-5b1d-4f7a-9c3e-2d8b7a6e5f41"


def test_the_hint_gives_the_whole_run_id() -> None:
    hint = timeline_hint(RUN, Path(".streamagent").resolve(), Path(".streamagent"))  # as the stack holds it
    assert f"streamagent show {RUN} " in hint and "STREAMAGENT_DATA_DIR" not in hint


def test_beside_a_running_stack_the_hint_names_the_demos_own_data_dir() -> None:
    own = Path("/tmp/my data/.streamagent/demo")  # a space: quoted for the shell
    hint = timeline_hint(RUN, own, Path("/tmp/my data/.streamagent"))
    command = hint.split(": ", 1)[1].split("  (")[0]
    assert shlex.split(command) == [f"STREAMAGENT_DATA_DIR={own}", "streamagent", "show", RUN]
