"""The client's account in a CRM (HubSpot/Salesforce-like): created, or updated if it exists."""

from __future__ import annotations

from pydantic import BaseModel
from streamagent.tools.sdk import CallContext, Tool, body


class AccountInput(BaseModel):
    domain: str
    name: str
    industry: str = ""
    employees: int | None = None
    country: str = ""
    owner_email: str = ""


class Account(BaseModel):
    id: str
    domain: str
    name: str
    created: bool  # False: an existing account (same domain) was updated


class Crm(Tool[AccountInput, Account]):
    name = "crm"
    description = "Create the client's account in the CRM, or update it if an account with its domain exists"
    input_model = AccountInput
    output_model = Account

    async def call(self, args: AccountInput, ctx: CallContext) -> Account:
        payload = args.model_dump(exclude={"domain"})
        data = body(await ctx.request("PUT", f"/crm/v1/accounts/{args.domain}", json=payload))
        return self.output(data)  # type: ignore[return-value]
