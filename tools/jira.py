"""Jira project creation, and closing the project again as the step's compensation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from streamagent.tools.sdk import CallContext, Tool, body


class ProjectRequest(BaseModel):
    key: str = Field(pattern=r"^[A-Z][A-Z0-9]{1,9}$")
    name: str
    description: str = ""
    lead_email: str


class Project(BaseModel):
    id: str
    key: str
    url: str


class Jira(Tool[ProjectRequest, Project]):
    name = "jira"
    description = "Create the client's Jira project"
    input_model = ProjectRequest
    output_model = Project

    async def call(self, args: ProjectRequest, ctx: CallContext) -> Project:
        payload = {
            "key": args.key,
            "name": args.name,
            "description": args.description,
            "leadAccountEmail": args.lead_email,
        }
        data = body(await ctx.request("POST", "/jira/rest/api/3/project", json=payload))
        return self.output({"id": str(data.get("id", "")) or None, "key": data.get("key"), "url": data.get("self", "")})  # type: ignore[return-value]

    async def compensate(self, args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        await ctx.request("DELETE", f"/jira/rest/api/3/project/{args['key']}")
        return {"closed": args["key"]}
