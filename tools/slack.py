"""Announcement in a Slack channel."""

from __future__ import annotations

from pydantic import BaseModel
from streamagent.tools.sdk import CallContext, PermanentError, Tool, body


class Post(BaseModel):
    channel: str
    text: str


class Posted(BaseModel):
    channel: str
    ts: str


class Slack(Tool[Post, Posted]):
    name = "slack"
    description = "Announce the new client in the onboarding channel"
    input_model = Post
    output_model = Posted

    async def call(self, args: Post, ctx: CallContext) -> Posted:
        data = body(await ctx.request("POST", "/slack/api/chat.postMessage", json=args.model_dump()))
        if not data.get("ok"):
            # Slack answers 200 with ok=false for a refused post.
            raise PermanentError(f"slack refused the post: {data.get('error', 'unknown error')}")
        return self.output({"channel": data.get("channel"), "ts": data.get("ts")})  # type: ignore[return-value]
