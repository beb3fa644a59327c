"""What drafting one welcome email costs the draft tool besides the model's own time: the prompt, one
chat completion against the scripted fake model (tools/sandbox/model.py, real HTTP on loopback, answering
at once) and the checks of the answer; and the checks alone (tools/drafting.py ``problems``).

``--calls`` sequential ``DraftEmail.call`` after a few warm-up calls; a real model adds its generation
time (seconds) on top. Prints a table, then one JSON line per result.

    .venv/bin/python bench/draft_call.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from streamagent.tools.draft import DraftEmail, DraftInput
from streamagent.tools.drafting import Draft, Facts, problems
from streamagent.tools.sandbox.model import FakeModel
from streamagent.tools.sdk import CallContext
from streamagent.tools.sdk.tool import ModelUse

from streamagent.config import Settings

WARM_UP = 10
ARGS = DraftInput(
    company_name="Acme Robotics",
    company_domain="acme-robotics.io",
    contact_name="Ada Lovelace",
    jira_key="ACME1X2Y3Z",
    industry="robotics",
    employees=120,
    goal="onboard new B2B client",
    template_subject="Welcome to streamagent, Acme Robotics",
    template_body="Hello Ada Lovelace,\n\nWelcome aboard! We set up Jira project ACME1X2Y3Z for Acme Robotics.\n",
)


async def calls(settings: Settings, count: int) -> list[float]:
    tool = DraftEmail(settings)
    out = []
    async with httpx.AsyncClient() as http:
        for i in range(WARM_UP + count):
            started = time.perf_counter()
            drafted = await tool.call(ARGS, CallContext(http, "bench", f"c-{i}", 1, ModelUse()))
            if i >= WARM_UP:
                out.append((time.perf_counter() - started) * 1000)
            assert drafted.drafted_by == "model", drafted.fallback_reason
    return out


def checks(count: int) -> list[float]:
    facts = Facts.model_validate(ARGS.model_dump(include=set(Facts.model_fields)))
    draft = Draft(subject="Acme Robotics, welcome: ACME1X2Y3Z", body="Dear Ada Lovelace,\n\n" + "Welcome aboard. " * 40)
    out = []
    for _ in range(count):
        started = time.perf_counter()
        assert problems(draft, facts) == []
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(name: str, samples: list[float]) -> dict[str, object]:
    cuts = statistics.quantiles(samples, n=100)
    return {
        "bench": "draft_call",
        "measure": name,
        "n": len(samples),
        "p50_ms": round(cuts[49], 3),
        "p95_ms": round(cuts[94], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with FakeModel() as model:
        settings = Settings(openai_base_url=model.url, model="fake-writer", model_max_retries=0)
        results = [
            summary("draft call (fake model, loopback)", asyncio.run(calls(settings, args.calls))),
            summary("checks of one draft", checks(args.calls * 10)),
        ]
    print(f"{'measure':<36} {'n':>6} {'p50 ms':>9} {'p95 ms':>9}")
    for r in results:
        print(f"{r['measure']:<36} {r['n']:>6} {r['p50_ms']:>9} {r['p95_ms']:>9}")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
