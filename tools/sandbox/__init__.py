"""The SaaS sandbox: fake enrichment, Jira, email and Slack APIs that record effects and inject faults."""

from streamagent.tools.sandbox.apis import API_NAMES, Effect
from streamagent.tools.sandbox.client import SandboxClient, SandboxError
from streamagent.tools.sandbox.faults import FaultSpec
from streamagent.tools.sandbox.server import Sandbox, SandboxServer, serve

__all__ = [
    "API_NAMES",
    "Effect",
    "FaultSpec",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "SandboxServer",
    "serve",
]
