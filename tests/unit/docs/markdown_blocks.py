"""The fenced code blocks of the documentation, and which of them are runnable examples.

A fenced ``bash`` (or ``sh``) block is runnable when the line right before its opening fence is the
HTML comment ``<!-- runnable -->``. The comment renders as nothing on GitHub and on the mkdocs site,
and needs no extension. A marker before anything else (prose, another language, a blank line) is an
error, so a marker cannot silently stop marking. Fences follow CommonMark: three or more backticks
or tildes, closed by a fence of the same character at least as long, so a block may show a fence
(and a marker) inside a longer one as plain content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MARKER = "<!-- runnable -->"
RUNNABLE_LANGUAGES = ("bash", "sh")
_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


class MarkerError(ValueError):
    """A runnable marker that marks no shell block."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    runnable: bool

    @property
    def where(self) -> str:
        try:
            shown = self.path.relative_to(ROOT)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}"


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of one Markdown file, in order."""
    lines = (path.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == MARKER:
            opening = _OPEN.match(lines[i + 1]) if i + 1 < len(lines) else None
            language = opening["info"].split()[0] if opening and opening["info"].strip() else ""
            if opening is None or language not in RUNNABLE_LANGUAGES:
                raise MarkerError(
                    f"{path}:{i + 1}: {MARKER} must be the line right before a fenced "
                    f"{' or '.join(RUNNABLE_LANGUAGES)} block"
                )
            i += 1
            continue
        opening = _OPEN.match(line)
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        info = opening["info"].strip()
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        marked = i > 0 and lines[i - 1].strip() == MARKER
        found.append(
            Block(
                path=path,
                line=i + 1,
                language=info.split()[0] if info else "",
                code="\n".join(body) + "\n",
                runnable=marked,
            )
        )
        i = j + 1
    return found


def doc_files(root: Path = ROOT) -> list[Path]:
    """The Markdown files whose examples are checked: the README and every page of the site."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def runnable_blocks(paths: list[Path] | None = None) -> list[Block]:
    return [b for path in (paths or doc_files()) for b in blocks(path) if b.runnable]
