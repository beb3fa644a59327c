"""ops/prometheus/rules.yml is valid (``promtool check rules``) and each alert fires when it should and
only then (``promtool test rules`` on ops/prometheus/tests/*.yml).

promtool comes from Debian's ``prometheus`` package, which CI installs (.ci/run): with CI set, a
missing promtool fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "ops" / "prometheus" / "rules.yml"
RULE_TESTS = sorted((ROOT / "ops" / "prometheus" / "tests").glob("*.yml"))
# What the issue asks the alerts to cover, by name: each must be defined and unit-tested.
REQUIRED_ALERTS = {
    "StreamagentConsumerLagGrowing",
    "StreamagentDeadLettersIncreasing",
    "StreamagentCircuitOpen",
    "StreamagentRunsStuck",
    "StreamagentCostPerRunAboveBudget",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool is not installed (Debian package prometheus: apt-get install --no-install-recommends prometheus)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must check the alert rules, but {message}")
        pytest.skip(message)
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_checks_the_rules() -> None:
    done = _run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    assert RULE_TESTS, "no rule tests under ops/prometheus/tests"
    done = _run("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_required_alert_is_defined_and_tested() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= REQUIRED_ALERTS, f"missing alerts: {sorted(REQUIRED_ALERTS - alerts)}"
    tested: dict[str, bool] = {}
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                tested[check["alertname"]] = tested.get(check["alertname"], False) or bool(check.get("exp_alerts"))
    # "Tested" means at least one case expects it to fire (a test expecting only silence proves nothing).
    assert {a for a in REQUIRED_ALERTS if tested.get(a)} == REQUIRED_ALERTS, f"alerts never seen firing: {tested}"


def test_a_broken_expectation_fails_promtool(tmp_path: Path) -> None:
    """The rule tests have teeth: the same file expecting the lag alert on the steady group fails."""
    source = (ROOT / "ops" / "prometheus" / "tests" / "alerts.yml").read_text()
    broken = source.replace(
        "exp_labels: {severity: warning, group: streamagent.tool.jira}",
        "exp_labels: {severity: warning, group: streamagent.decision}",
        1,
    )
    assert broken != source
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "broken.yml").write_text(broken)
    done = _run("test", "rules", str(tmp_path / "tests" / "broken.yml"))
    assert done.returncode != 0
    assert "StreamagentConsumerLagGrowing" in done.stdout + done.stderr
