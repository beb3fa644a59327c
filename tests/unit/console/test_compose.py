"""docker-compose.yml is the production shape; these checks keep it in step with the code.

No Docker engine is needed: the file is parsed, its settings validated against ``Settings``, and
``docker-compose config`` (Debian's ``docker-compose`` package, which CI installs) checks the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamagent.config import ENV_PREFIX, Settings, settings_from
from streamagent.console.devstack.stack import PROCESSORS, stack_tools

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
SETTING_VARS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
# ${VAR}, ${VAR:-default}, ${VAR-default}: compose's interpolation.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _resolved(value: str) -> str:
    """``value`` as compose renders it with nothing set in the environment (defaults taken)."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _streamagent_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def test_every_streamagent_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    unknown = {
        f"{name}: {key}"
        for name, svc in compose["services"].items()
        for key in _environment(svc)
        if key.startswith(ENV_PREFIX) and key not in SETTING_VARS
    }
    assert not unknown, f"not fields of streamagent.config.Settings: {sorted(unknown)}"


def test_every_interpolated_streamagent_variable_is_a_real_setting() -> None:
    referenced = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    unknown = {v for v in referenced if v.startswith(ENV_PREFIX) and v not in SETTING_VARS}
    assert not unknown, f"compose reads {sorted(unknown)}, which Settings does not define"


def test_every_service_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    services = _streamagent_services(compose)
    assert services, "no service builds the streamagent image"
    for name, svc in services.items():
        env = {k: _resolved(v) for k, v in _environment(svc).items()}
        settings = settings_from(env)  # raises on a value Settings refuses
        assert settings.bootstrap_servers, f"{name}: no bootstrap servers"
        assert settings.database_url.startswith("postgresql://"), name
        # Production runs on Kafka's own client defaults, not the embedded broker's short ones.
        assert settings.session_timeout_ms >= 30_000, name
        assert settings.metrics_port == 9100, name


def test_every_processor_and_tool_has_its_own_service(compose: dict[str, Any]) -> None:
    commands = {tuple(_command(svc)): name for name, svc in _streamagent_services(compose).items()}
    missing = [f"processor {p}" for p in PROCESSORS if ("processor", p) not in commands]
    missing += [f"tool {t}" for t in stack_tools(Settings()) if ("tool", t) not in commands]
    assert not missing, f"no compose service runs: {missing}"
    assert ("topics", "create") in commands, "no one-shot `topics create` service"
    assert any(c[:1] == ("sandbox",) for c in commands), "no sandbox service"
    for name in ("kafka", "postgres", "prometheus", "grafana"):
        assert name in compose["services"], name
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft


def test_static_membership_ids_are_unique(compose: dict[str, Any]) -> None:
    ids = [
        _environment(svc)["STREAMAGENT_GROUP_INSTANCE_ID"]
        for svc in compose["services"].values()
        if "STREAMAGENT_GROUP_INSTANCE_ID" in _environment(svc)
    ]
    assert len(ids) == len(set(ids)), f"two services share a group.instance.id: {ids}"


def test_prometheus_scrapes_every_long_running_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        target.split(":")[0]
        for job in config["scrape_configs"]
        for group in job.get("static_configs", [])
        for target in group["targets"]
    } - {"localhost"}
    wanted = {
        name for name, svc in _streamagent_services(compose).items() if _command(svc)[:1] in (["processor"], ["tool"])
    }
    assert wanted <= targets, f"not scraped: {sorted(wanted - targets)}"
    assert targets <= set(compose["services"]), (
        f"scraped but not a service: {sorted(targets - set(compose['services']))}"
    )


def test_dockerfile_copies_only_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    binary = _compose_binary()
    if binary is None:
        message = "docker-compose is not installed (Debian: apt-get install docker-compose; .ci/run does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must validate docker-compose.yml, but {message}")
        pytest.skip(message)
    # Only compose's own view of the file: no inherited overrides, no engine needed for `config`.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    result = subprocess.run(
        [*binary, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(binary)} config rejected docker-compose.yml:\n{result.stderr}"


def test_each_service_mounts_only_the_keys_of_its_role(compose: dict[str, Any]) -> None:
    """Least privilege (streamagent.authn): the pipeline's core (state, decision, projection, memory) mounts the
    command keys; intake and each tool mount only their own role key, so a leaked tool container can
    neither sign as another tool nor approve; the approval token keys go to the decision processor (it
    mints tokens) and the tools (they check them); nothing else gets any key."""
    assert {"command-keys", "approval-keys", "intake-key"} <= set(compose["secrets"])
    core = (["processor", "state"], ["processor", "decision"], ["processor", "projection"], ["processor", "memory"])
    for name, svc in _streamagent_services(compose).items():
        command = _command(svc)
        env = _environment(svc)
        approvals = command == ["processor", "decision"] or command[:1] == ["tool"]
        if command in core:
            wanted = ["command-keys", "approval-keys"] if approvals else ["command-keys"]
            assert svc.get("secrets") == wanted, name
            assert env.get(f"{ENV_PREFIX}COMMAND_KEYS_FILE") == "/run/secrets/command-keys", name
            assert f"{ENV_PREFIX}ROLE_KEYS_FILE" not in env, name
        elif command[:1] == ["tool"] or command == ["processor", "intake"]:
            role = f"tool-{command[1]}-key" if command[0] == "tool" else "intake-key"
            assert svc.get("secrets") == ([role, "approval-keys"] if approvals else [role]), name
            assert env.get(f"{ENV_PREFIX}ROLE_KEYS_FILE") == f"/run/secrets/{role}", name
            assert f"{ENV_PREFIX}COMMAND_KEYS_FILE" not in env, name
        else:
            assert "secrets" not in svc and f"{ENV_PREFIX}COMMAND_KEYS_FILE" not in env, name
            assert f"{ENV_PREFIX}ROLE_KEYS_FILE" not in env, name
        assert (env.get(f"{ENV_PREFIX}APPROVAL_KEYS_FILE") == "/run/secrets/approval-keys") == approvals, name
