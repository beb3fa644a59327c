"""The documentation: the site builds with no warning, the README stays a short guide whose links all
land, every Python example compiles, every setting is listed, and the runnable-example marker finds
what it should (the examples themselves run in tests/integration/test_docs_examples.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_blocks import ROOT, MarkerError, blocks, doc_files, runnable_blocks

from streamagent.config import Settings, env_name

README = ROOT / "README.md"
README_MAX_LINES = 260
# [text](target) and ![alt](target); a target ends at the first space (a title may follow) or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_the_site_builds_with_no_warning(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's banner about MkDocs 2, not about the site
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "operations" / "run-page" / "index.html").exists()
    assert not (tmp_path / "site" / "ui_screenshot.py").exists()  # the script beside ui.png is no page


def test_the_readme_is_a_short_guide() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_the_readme_keeps_the_commands_ci_and_newcomers_run() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert re.search(r"^\s*make test\s*$", (ROOT / ".ci" / "run").read_text(), re.M), ".ci/run runs `make test`"
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), re.M)


def test_the_readme_links_only_to_files_that_exist() -> None:
    targets = LINK.findall(README.read_text())
    assert targets, "the README links to the site's pages"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto: and the README's own anchors
        path = (ROOT / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            missing.append(target)
    assert missing == [], f"README.md links to files that do not exist in the repository: {missing}"


def test_every_python_example_compiles() -> None:
    """On the Python the project runs on (3.11: no backslash inside an f-string's braces, for one)."""
    found = [b for path in doc_files() for b in blocks(path) if b.language in ("python", "py")]
    assert found
    for block in found:
        compile(block.code, block.where, "exec")


def test_every_setting_is_on_the_configuration_page() -> None:
    page = (ROOT / "docs" / "operations" / "configuration.md").read_text()
    missing = [env_name(name) for name in Settings.model_fields if f"`{env_name(name)}`" not in page]
    assert missing == [], f"settings missing from docs/operations/configuration.md: {missing}"


# -- the runnable-example marker ---------------------------------------------------------------------
PAGE = """\
# A page

<!-- runnable -->
```bash
streamagent runs
```

```bash
streamagent up
```

````markdown
<!-- runnable -->
```bash
shown, not run
```
````

- a list item:

  <!-- runnable -->
  ```sh
  streamagent tools
  ```
"""


def test_a_marked_block_is_runnable_and_an_unmarked_one_is_not(tmp_path: Path) -> None:
    found = blocks(tmp_path / "page.md", PAGE)
    assert [(b.line, b.language, b.runnable) for b in found] == [
        (4, "bash", True),
        (8, "bash", False),
        (12, "markdown", False),  # a marker shown inside a longer fence is content, not a marker
        (22, "sh", True),
    ]
    assert found[0].code == "streamagent runs\n"
    assert found[2].code == "<!-- runnable -->\n```bash\nshown, not run\n```\n"
    assert found[3].code == "streamagent tools\n"  # the list item's indentation is not part of the code
    assert found[0].where.endswith("page.md:4")


@pytest.mark.parametrize(
    "text",
    [
        "<!-- runnable -->\n\n```bash\nstreamagent runs\n```\n",  # a blank line between
        "<!-- runnable -->\n```python\nprint(1)\n```\n",  # not a shell block
        "<!-- runnable -->\nsome prose\n",
        "text\n<!-- runnable -->\n",  # at the end of the file
    ],
)
def test_a_marker_that_marks_no_shell_block_is_an_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(MarkerError, match=r"page\.md:\d+: <!-- runnable --> must be"):
        blocks(tmp_path / "page.md", text)


def test_the_readme_and_the_site_have_runnable_examples() -> None:
    found = runnable_blocks()
    assert {b.path for b in found} >= {README}, "the README's own examples are not marked runnable"
    assert any(b.path.is_relative_to(ROOT / "docs") for b in found)
