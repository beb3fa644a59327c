"""Welcome email through a SendGrid-like mail API."""

from __future__ import annotations

from pydantic import BaseModel, EmailStr
from streamagent.tools.sdk import CallContext, Tool, body

SENDER = "onboarding@streamagent.dev"


class Mail(BaseModel):
    to: EmailStr
    subject: str
    body: str


class Sent(BaseModel):
    message_id: str
    to: str


class Email(Tool[Mail, Sent]):
    name = "email"
    description = "Send the welcome email to the client's contact"
    input_model = Mail
    output_model = Sent

    async def call(self, args: Mail, ctx: CallContext) -> Sent:
        payload = {
            "personalizations": [{"to": [{"email": args.to}]}],
            "from": {"email": SENDER},
            "subject": args.subject,
            "content": [{"type": "text/plain", "value": args.body}],
        }
        data = body(await ctx.request("POST", "/email/v3/mail/send", json=payload))
        return self.output({"message_id": data.get("message_id"), "to": args.to})  # type: ignore[return-value]
