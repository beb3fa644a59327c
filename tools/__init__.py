"""The tools: each is its own consumer group and OS process (``streamagent tool NAME``)."""

from __future__ import annotations

from typing import Any

from streamagent.tools.sdk.tool import Tool


def builtin_tools() -> dict[str, type[Tool[Any, Any]]]:
    from streamagent.tools.crm import Crm
    from streamagent.tools.email import Email
    from streamagent.tools.enrich import Enrich
    from streamagent.tools.jira import Jira
    from streamagent.tools.slack import Slack

    return {t.name: t for t in (Enrich, Jira, Email, Slack, Crm)}
