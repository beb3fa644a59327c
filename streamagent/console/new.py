"""``streamagent new tool NAME [--dir DIR]``: write a team's own tool package, ready to test and deploy.

The package (``tool_template``) has its own pyproject (registering the tool under the ``streamagent.tools``
entry-point group), the tool, its test against a fake API, an example workflow and a README; it passes
its own test as written (``pip install DIR``, then ``pytest DIR``). A bad name or an existing folder is
refused with one line before anything is written.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from streamagent.console import tool_template
from streamagent.console.errors import CliError

# As the catalogue's Announcement.name, shorter (the command topic and the group id carry it), and
# without "_": one character only, so that the package name (`-` becomes `_`) maps back to one tool name.
TOOL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
# Names the `tool` command takes for something else than a tool (the MCP bridge: `streamagent tool mcp`).
RESERVED = frozenset({"mcp"})


def check_name(name: str) -> str:
    """``name`` if it can name a new tool; else ``CliError`` saying why."""
    if not TOOL_NAME.match(name) or name.endswith("-") or "--" in name:
        raise CliError(
            f"invalid tool name {name!r}: use 1-40 lowercase letters, digits and single '-', starting with a letter"
            " (it names the command topic and the consumer group)",
            code=2,
        )
    if name in RESERVED:
        raise CliError(f"invalid tool name {name!r}: `streamagent tool {name}` is a command of its own", code=2)
    from streamagent.tools import builtin_tools

    existing = builtin_tools().get(name)
    if existing is not None:
        raise CliError(f"a tool named {name!r} exists already ({existing.__module__}); pick another name", code=2)
    return name


def files(name: str) -> dict[str, str]:
    """The package's files by path relative to its folder."""
    module = name.replace("-", "_") + "_tool"
    values = {
        "name": name,
        "dist": f"{name}-tool",
        "module": module,
        "cls": "".join(part.capitalize() for part in name.split("-")),
        "path": name,
    }
    return {
        "pyproject.toml": tool_template.PYPROJECT.substitute(values),
        "README.md": tool_template.README.substitute(values),
        f"src/{module}/__init__.py": tool_template.INIT.substitute(values),
        f"src/{module}/tool.py": tool_template.TOOL.substitute(values),
        f"tests/test_{module}.py": tool_template.TEST.substitute(values),
        f"workflows/{name}-example.toml": tool_template.WORKFLOW.substitute(values),
    }


def write_tool_package(name: str, directory: Path | None = None) -> Path:
    """Write the package of tool ``name`` into ``directory`` (default ``./NAME-tool``), which must not exist."""
    check_name(name)
    target = directory if directory is not None else Path(f"{name}-tool")
    if target.exists():
        raise CliError(f"{target} exists already: give a new folder with --dir", code=2)
    if not target.parent.resolve().is_dir():
        raise CliError(f"cannot create {target}: {target.parent} is not a folder", code=2)
    try:
        for relative, text in files(name).items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write the package into {target}: {exc.strerror or exc}") from None
    return target


def cmd_new_tool(args: argparse.Namespace) -> int:
    target = write_tool_package(args.name, args.dir)
    module = args.name.replace("-", "_") + "_tool"
    print(f"wrote the {args.name} tool package in {target}/")
    print(f"  edit        {target}/src/{module}/tool.py")
    print(f"  test        pip install '{target}[test]' && pytest {target}")
    print(f"  deploy      pip install {target} && streamagent tool {args.name}")
    print(f"  workflow    {target}/workflows/{args.name}-example.toml (add the folder to STREAMAGENT_WORKFLOWS_DIR)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    help_ = "Write a new package: a tool of your own (its pyproject, tool, test, example workflow)"
    new = sub.add_parser("new", help=help_, description=help_)
    new_sub = new.add_subparsers(dest="new_command", required=True, metavar="{tool}")
    tool = new_sub.add_parser(
        "tool",
        help="a tool package outside this repository",
        description="Write a tool package: pip install it, test it with pytest, deploy it with `streamagent tool NAME`",
    )
    tool.add_argument("name", help="the tool's name: lowercase letters, digits and '-'")
    tool.add_argument("--dir", type=Path, metavar="DIR", help="where to write it (must not exist; default ./NAME-tool)")
    tool.set_defaults(func=cmd_new_tool)
