"""Company enrichment (Clearbit-like): domain in, firmographics out."""

from __future__ import annotations

from pydantic import BaseModel
from streamagent.tools.sdk import CallContext, Tool, body


class EnrichInput(BaseModel):
    domain: str


class Company(BaseModel):
    name: str
    domain: str
    industry: str
    employees: int
    country: str
    description: str = ""


class Enrich(Tool[EnrichInput, Company]):
    name = "enrich"
    description = "Look up a company's industry, size and country from its domain"
    input_model = EnrichInput
    output_model = Company

    async def call(self, args: EnrichInput, ctx: CallContext) -> Company:
        response = await ctx.request("GET", "/enrich/v2/companies/find", params={"domain": args.domain})
        return self.output(body(response))  # type: ignore[return-value]
