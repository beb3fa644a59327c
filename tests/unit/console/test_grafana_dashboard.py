"""Every metric a Grafana panel queries is one the code exports (or a recording rule of rules.yml).

The names come from prometheus_client's registry after importing every streamagent module, so a
metric renamed or dropped in code fails here, not on a blank panel in production. Alert and recording
rule expressions are held to the same standard.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import streamagent

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "streamagent.json"
RULES = ROOT / "ops" / "prometheus" / "rules.yml"
# Prometheus's own series, not ours.
PROMETHEUS_SERIES = {"up"}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])\s*(\()?")


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: identifiers that are neither functions, keywords,
    label names (in matchers or grouping clauses), strings, durations nor Grafana variables."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {m.group(1) for m in _NAME.finditer(text) if m.group(2) is None and m.group(1).lower() not in KEYWORDS}


def exported() -> set[str]:
    """Every series name the code can export, with the suffixes each metric type adds."""
    for module in pkgutil.walk_packages(streamagent.__path__, "streamagent."):
        if ".sandbox" in module.name or module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "gauge": ("",),
        "info": ("_info",),
    }
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def recorded() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def _panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", []) if t.get("expr")]


@pytest.fixture(scope="module")
def known() -> set[str]:
    return exported() | recorded() | PROMETHEUS_SERIES


def test_the_extractor_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (tool, le) (rate(streamagent_tool_call_seconds_bucket{outcome="x"}'
        "[$__rate_interval]))) / on (tool) group_left streamagent:recorded:rule offset 5m > bool 1"
    )
    assert metric_names(expr) == {"streamagent_tool_call_seconds_bucket", "streamagent:recorded:rule"}


def test_every_dashboard_panel_queries_exported_metrics(known: set[str]) -> None:
    exprs = _panel_exprs()
    assert len(exprs) >= 20
    unknown = {f"{title}: {name}" for title, expr in exprs for name in metric_names(expr) if name not in known}
    assert not unknown, f"panels query metrics nothing exports: {sorted(unknown)}"


def test_every_panel_queries_some_metric() -> None:
    empty = [title for title, expr in _panel_exprs() if not metric_names(expr)]
    assert not empty, empty


def test_the_dashboard_shows_the_new_metrics() -> None:
    queried = {name for _, expr in _panel_exprs() for name in metric_names(expr)}
    for name in (
        "streamagent_consumer_lag",
        "streamagent_hop_seconds_bucket",
        "streamagent_step_seconds_bucket",
        "streamagent_model_tokens_total",
        "streamagent_model_cost_usd_total",
        "streamagent_decision_actions_total",
        "streamagent_tool_call_attempts_bucket",
        "streamagent_guard_outcomes_total",
    ):
        assert name in queried, name


def test_a_misspelt_metric_is_caught(known: set[str]) -> None:
    assert "streamagent_tool_calls_total" in known
    assert "streamagent_tool_call_total" not in known  # the check is not vacuous


def test_every_rule_expression_uses_exported_metrics(known: set[str]) -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    unknown = {
        f"{r.get('alert') or r.get('record')}: {name}"
        for r in rules
        for name in metric_names(r["expr"])
        if name not in known
    }
    assert not unknown, f"rules use metrics nothing exports: {sorted(unknown)}"
