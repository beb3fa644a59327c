"""``streamagent report``: the quality report as a terminal table (``--json`` prints the model)."""

from __future__ import annotations

import re
from datetime import timedelta

from streamagent.processors.projection.report import Figures, Report

_DURATION = re.compile(r"\s*(\d+)\s*([smhdw])\s*")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> timedelta:
    """``30m``, ``24h``, ``7d`` (also ``s`` and ``w``): a window ending now. ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise ValueError(f"expected a duration such as 30m, 24h or 7d, got {text!r}")
    try:
        return timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def _row(name: str, f: Figures) -> str:
    ended = f.completed + f.failed + f.escalated + f.cancelled
    calls = f"{f.tool_calls}/{f.min_tool_calls}" if f.min_tool_calls else str(f.tool_calls)
    return (
        f"{name[:22]:<22} {f.runs:>5} {ended:>5} {f.completed:>5} {f.failed:>5} {f.escalated:>5} {f.cancelled:>5}"
        f" {f.running:>5}"
        f" {_rate(f.success_rate):>7} {_seconds(f.duration_p50_s):>7} {_seconds(f.duration_p95_s):>7}"
        f" {_usd(f.cost_per_completed_usd):>10} {calls:>9} {f.retries:>7} {f.guard_refusals:>7}"
        f" {f.approvals:>5} {_seconds(f.approval_wait_p95_s):>7}"
    )


def describe_window(window: timedelta) -> str:
    """``timedelta(hours=24)`` -> ``24h``, 48 hours -> ``2d``: the largest unit that divides it (a
    single day reads as 24h, as people say it)."""
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0 and (unit != "d" or seconds > size):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render(report: Report) -> str:
    scope = f"workflow {report.workflow}" if report.workflow else "all workflows"
    until = report.until.strftime("%Y-%m-%d %H:%M:%S UTC")
    if report.since is None:
        window = f"all runs up to {until}"
    else:
        start = report.since.strftime("%Y-%m-%d %H:%M:%S UTC")
        window = f"runs requested in the last {describe_window(report.until - report.since)} ({start} to {until})"
    lines = [f"Quality report: {window}, {scope}", ""]
    if report.total.runs == 0:
        lines.append("no runs in this window")
        return "\n".join(lines)
    lines.append(
        f"{'workflow':<22} {'runs':>5} {'ended':>5} {'ok':>5} {'fail':>5} {'esc':>5} {'cncl':>5}"
        f" {'run':>5}"
        f" {'success':>7} {'p50':>7} {'p95':>7} {'cost/ok':>10} {'calls/min':>9} {'retries':>7}"
        f" {'refused':>7} {'appr':>5} {'wait95':>7}"
    )
    for name, figures in report.workflows.items():
        lines.append(_row(name, figures))
    if len(report.workflows) > 1:
        lines.append(_row("all", report.total))
    t = report.total
    tokens = t.prompt_tokens + t.completion_tokens
    lines += [
        "",
        f"ended runs: {t.decisions} decisions, {t.tool_calls} tool calls ({t.excess_tool_calls} beyond the"
        f" workflows' {t.min_tool_calls} steps), {t.tool_attempts} attempts ({t.retries} retries),"
        f" {tokens} tokens, {_usd(t.cost_usd)} in total; duration max {_seconds(t.duration_max_s)}",
        f"shared memory: {t.stale_memory} command(s) decided again because what they read changed before"
        f" the call; {t.memory_after_effect} change(s) arrived after a step's effect (kept, recorded)",
    ]
    if report.failure_reasons:
        lines += ["", "Top failure reasons:"]
        for reason in report.failure_reasons:
            where = f" at {reason.step}" if reason.step else ""
            lines.append(f"  {reason.runs:>4}  {reason.status}{where}: {reason.reason}  (e.g. {reason.example_run_id})")
    return "\n".join(lines)
