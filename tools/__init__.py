"""The tools: each is its own consumer group and OS process (``streamagent tool NAME``)."""

from __future__ import annotations

from typing import Any

from tools.sdk.tool import Tool


def builtin_tools() -> dict[str, type[Tool[Any, Any]]]:
    from tools.crm import Crm
    from tools.email import Email
    from tools.enrich import Enrich
    from tools.jira import Jira
    from tools.slack import Slack

    return {t.name: t for t in (Enrich, Jira, Email, Slack, Crm)}
