"""Policy as data: what needs a person's approval, what a run may spend, how fast a tool may be called.

Policy lives in TOML files under ``STREAMAGENT_POLICIES_DIR`` (default: the repository's
``ops/policies/``), outside the model and outside the code that decides. Two places read it and
enforce it independently: the guard (processors/guard), before a command is produced, and the tool
SDK, before the external call. Both ask the same functions here, so they cannot disagree on what a
rule means; they can only disagree on which version of the files they read (see ``PolicyStore``).

Every ``*.toml`` of the folder is one file of the policy; together they make one policy, and where
two files set the same limit the stricter wins, so adding a file can only tighten what holds::

    [budgets]                       # every run; 0 or absent: no limit
    max_tool_calls = 12             # commands sent (dispatches and undos)
    max_steps = 16                  # decisions taken
    max_tokens = 200000             # model tokens, prompt + completion
    max_cost_usd = 1.0
    max_wall_time_s = 900           # since the run was requested

    [workflows.onboarding.budgets]  # the runs of one workflow (stricter of the two wins)
    max_tool_calls = 8

    [approvals]
    timeout_s = 86400               # a request unanswered this long escalates the run

    [[approvals.rules]]             # a command matching every condition given needs approval
    tool = "email"
    argument = "to"                 # with `not_matching`/`matching`: the argument's text
    not_matching = '@(example\\.com|example\\.org)$'
    reason = "email to a domain outside the allow-list"

    [[approvals.rules]]
    tool = "jira"
    environments = ["production"]   # STREAMAGENT_ENVIRONMENT
    reason = "Jira project creation in production"

    [rate_limits]                   # external calls per second, per tool process
    jira = 5.0

A bad file is refused with its path, the field and the reason (``PolicyError``), at start by every
process that reads policy, and at ``streamagent policies check``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUDGETS = ("max_tool_calls", "max_steps", "max_tokens", "max_cost_usd", "max_wall_time_s")
_RULE_FIELDS = {"tool", "argument", "matching", "not_matching", "environments", "workflows", "reason"}
_TOP_FIELDS = {"budgets", "workflows", "approvals", "rate_limits", "description"}
DEFAULT_APPROVAL_TIMEOUT_S = 86400.0


class PolicyError(ValueError):
    """A policy file is malformed: names the file, the field and why."""

    def __init__(self, file: Path | str, where: str, reason: str) -> None:
        super().__init__(f"{file}: {where}: {reason}")
        self.file, self.where, self.reason = str(file), where, reason


@dataclass(frozen=True)
class Budgets:
    """Per-run limits; None: no limit."""

    max_tool_calls: int | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_wall_time_s: float | None = None

    def stricter(self, other: Budgets) -> Budgets:
        def pick(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else min(a, b)

        return Budgets(*(pick(getattr(self, n), getattr(other, n)) for n in BUDGETS))


@dataclass(frozen=True)
class ApprovalRule:
    tool: str
    reason: str
    argument: str | None = None
    matching: re.Pattern[str] | None = None
    not_matching: re.Pattern[str] | None = None
    environments: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    source: str = ""

    def applies(self, tool: str, arguments: Mapping[str, Any], workflow: str | None, environment: str) -> bool:
        if tool != self.tool:
            return False
        if self.environments and environment not in self.environments:
            return False
        if self.workflows and workflow is not None and workflow not in self.workflows:
            return False
        if self.argument is None:
            return True
        value = arguments.get(self.argument)
        text = "" if value is None else str(value)
        if self.matching is not None and not self.matching.search(text):
            return False
        return self.not_matching is None or not self.not_matching.search(text)


@dataclass(frozen=True)
class Policy:
    """One version of the policy: every file of the folder, merged."""

    version: str  # a digest of the files' names and contents, recorded with every guard outcome
    budgets: Budgets = field(default_factory=Budgets)
    workflow_budgets: Mapping[str, Budgets] = field(default_factory=dict)
    rules: tuple[ApprovalRule, ...] = ()
    approval_timeout_s: float = DEFAULT_APPROVAL_TIMEOUT_S
    rate_limits: Mapping[str, float] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def budgets_for(self, workflow: str | None) -> Budgets:
        extra = self.workflow_budgets.get(workflow or "")
        return self.budgets if extra is None else self.budgets.stricter(extra)

    def approval_reason(
        self, tool: str, arguments: Mapping[str, Any], workflow: str | None, environment: str
    ) -> str | None:
        """Why this command needs a person's approval (the first rule that matches), or None."""
        for rule in self.rules:
            if rule.applies(tool, arguments, workflow, environment):
                return rule.reason
        return None

    def rate_limit(self, tool: str) -> float | None:
        return self.rate_limits.get(tool)


EMPTY = Policy(version="none")


# -- loading -------------------------------------------------------------------------------------------
def load_policy(directory: Path) -> Policy:
    """Every ``*.toml`` of ``directory`` as one policy. A missing folder is no policy (nothing is held,
    no budget); an unreadable or malformed file raises ``PolicyError``."""
    if not directory.exists():
        return EMPTY
    if not directory.is_dir():
        raise PolicyError(directory, "policies_dir", "is not a directory")
    paths = sorted(directory.glob("*.toml"))
    digest = hashlib.sha256()
    budgets = Budgets()
    workflow_budgets: dict[str, Budgets] = {}
    rules: list[ApprovalRule] = []
    timeout: float | None = None
    rates: dict[str, float] = {}
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(path, "file", exc.strerror or str(exc)) from None
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(path, "toml", str(exc)) from None
        part = _Loader(path).policy(data)
        budgets = budgets.stricter(part.budgets)
        for name, b in part.workflow_budgets.items():
            workflow_budgets[name] = workflow_budgets.get(name, Budgets()).stricter(b)
        rules.extend(part.rules)
        if part.approval_timeout_s != DEFAULT_APPROVAL_TIMEOUT_S or timeout is None:
            timeout = part.approval_timeout_s if timeout is None else min(timeout, part.approval_timeout_s)
        for tool, rate in part.rate_limits.items():
            rates[tool] = min(rate, rates.get(tool, rate))
    return Policy(
        version=digest.hexdigest()[:12] if paths else "none",
        budgets=budgets,
        workflow_budgets=workflow_budgets,
        rules=tuple(rules),
        approval_timeout_s=timeout if timeout is not None else DEFAULT_APPROVAL_TIMEOUT_S,
        rate_limits=rates,
        files=tuple(str(p) for p in paths),
    )


def _keys(value: Any) -> set[str]:
    """Tables keyed by a name of the user's (workflows, tools): any key is allowed."""
    return set(value) if isinstance(value, Mapping) else set()


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, reason: str) -> PolicyError:
        return PolicyError(self.path, where, reason)

    def table(self, value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, "must be a table")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    f"{where}.{key}" if where else key, f"unknown field (allowed: {', '.join(sorted(allowed))})"
                )
        return value

    def policy(self, data: Mapping[str, Any]) -> Policy:
        self.table(data, "", _TOP_FIELDS)
        budgets = self.budgets(data.get("budgets", {}), "budgets")
        workflows: dict[str, Budgets] = {}
        raw_workflows = data.get("workflows", {})
        for name, table in self.table(raw_workflows, "workflows", _keys(raw_workflows)).items():
            inner = self.table(table, f"workflows.{name}", {"budgets"})
            workflows[name] = self.budgets(inner.get("budgets", {}), f"workflows.{name}.budgets")
        approvals = self.table(data.get("approvals", {}), "approvals", {"timeout_s", "rules"})
        timeout = approvals.get("timeout_s", DEFAULT_APPROVAL_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise self.fail("approvals.timeout_s", f"must be a number of seconds > 0, not {timeout!r}")
        raw_rules = approvals.get("rules", [])
        if not isinstance(raw_rules, list):
            raise self.fail("approvals.rules", "must be an array of tables ([[approvals.rules]])")
        rules = tuple(self.rule(r, f"approvals.rules[{i}]") for i, r in enumerate(raw_rules))
        rates: dict[str, float] = {}
        raw_rates = data.get("rate_limits", {})
        for tool, rate in self.table(raw_rates, "rate_limits", _keys(raw_rates)).items():
            if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
                raise self.fail(f"rate_limits.{tool}", f"must be calls per second > 0, not {rate!r}")
            rates[tool] = float(rate)
        return Policy(
            version="",
            budgets=budgets,
            workflow_budgets=workflows,
            rules=rules,
            approval_timeout_s=float(timeout),
            rate_limits=rates,
        )

    def budgets(self, value: Any, where: str) -> Budgets:
        table = self.table(value, where, set(BUDGETS))
        out: dict[str, Any] = {}
        for name, limit in table.items():
            whole = name in ("max_tool_calls", "max_steps", "max_tokens")
            ok = not isinstance(limit, bool) and (isinstance(limit, int) if whole else isinstance(limit, int | float))
            if not ok or limit < 0:
                kind = "a whole number >= 0" if whole else "a number >= 0"
                raise self.fail(f"{where}.{name}", f"must be {kind} (0: no limit), not {limit!r}")
            out[name] = None if limit == 0 else limit
        return Budgets(**out)

    def rule(self, value: Any, where: str) -> ApprovalRule:
        table = self.table(value, where, _RULE_FIELDS)
        tool = table.get("tool")
        if not isinstance(tool, str) or not tool:
            raise self.fail(f"{where}.tool", "is required: the tool whose commands the rule holds")
        reason = table.get("reason", f"policy: {tool} needs approval")
        if not isinstance(reason, str) or not reason.strip():
            raise self.fail(f"{where}.reason", "must be non-empty text")
        argument = table.get("argument")
        if argument is not None and (not isinstance(argument, str) or not argument):
            raise self.fail(f"{where}.argument", "must be the name of one of the tool's arguments")
        patterns: dict[str, re.Pattern[str] | None] = {}
        for key in ("matching", "not_matching"):
            text = table.get(key)
            if text is None:
                patterns[key] = None
                continue
            if argument is None:
                raise self.fail(f"{where}.{key}", "needs `argument`: the argument whose text it matches")
            if not isinstance(text, str):
                raise self.fail(f"{where}.{key}", "must be a regular expression (text)")
            try:
                patterns[key] = re.compile(text)
            except re.error as exc:
                raise self.fail(f"{where}.{key}", f"is not a valid regular expression: {exc}") from None
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("environments", "workflows"):
            items = table.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                raise self.fail(f"{where}.{key}", "must be a list of names")
            lists[key] = tuple(items)
        return ApprovalRule(
            tool=tool,
            reason=reason.strip(),
            argument=argument,
            matching=patterns["matching"],
            not_matching=patterns["not_matching"],
            environments=lists["environments"],
            workflows=lists["workflows"],
            source=f"{self.path.name} {where}",
        )


class PolicyStore:
    """The policy in force, re-read when a file of the folder changes.

    Checked at most every ``reload_s`` (a ``stat`` of the folder's files, no read unless something
    moved), so an edit applies to the next decision or command without a restart. An edit that does
    not load keeps the last good policy in force, logs why once, and counts in ``failed_reloads``:
    a typo must not drop every rule. The first load has no good policy to keep, so it raises.
    """

    def __init__(self, directory: Path, reload_s: float = 1.0) -> None:
        self.directory = directory
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._stamp = self._fingerprint()
        self._policy = load_policy(directory)
        self._checked = time.monotonic()
        self.failed_reloads = 0
        self._bad_stamp: tuple[Any, ...] | None = None

    def _fingerprint(self) -> tuple[Any, ...]:
        if not self.directory.is_dir():
            return ()
        out = []
        for path in sorted(self.directory.glob("*.toml")):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return self._policy
        with self._lock:
            if now - self._checked < self.reload_s:
                return self._policy
            self._checked = now
            stamp = self._fingerprint()
            if stamp == self._stamp or stamp == self._bad_stamp:
                return self._policy
            try:
                policy = load_policy(self.directory)
            except PolicyError as exc:
                self._bad_stamp = stamp
                self.failed_reloads += 1
                log.error("policy edit refused, version %s stays in force: %s", self._policy.version, exc)
                return self._policy
            self._stamp, self._bad_stamp = stamp, None
            if policy.version != self._policy.version:
                log.info("policy %s in force (was %s)", policy.version, self._policy.version)
            self._policy = policy
            return policy
