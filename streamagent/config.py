"""The one place that reads the environment.

Every interval and timeout a test might want to shrink lives here, so tests set an environment
variable instead of sleeping. Values left empty (bootstrap servers, database URL, sandbox URL)
mean "start the embedded component".
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from streamagent.jsonobject import json_object

ENV_PREFIX = "STREAMAGENT_"
# The repository's workflows/ (the package is installed editable, like schemas/ in codec.py).
DEFAULT_WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"
DEFAULT_POLICIES_DIR = Path(__file__).resolve().parent.parent / "ops" / "policies"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["json", "text"]
# Only the deciders the decision processor can build: a value it would refuse at start must be
# refused here, before any process starts.
Decider = Literal["rules", "llm"]
# How the model answers: OpenAI tool calling, or a JSON object constrained by response_format
# json_schema (small local models answer the second reliably, the first often in prose).
AnswerStyle = Literal["tools", "json_schema", "json_object"]
# tool_choice in the tools style: "required" forces a call; llama-cpp-python's function-calling chat
# format takes only "auto" (its server answers 500 to "required").
ToolChoice = Literal["required", "auto"]
# Settings read under the name every OpenAI-compatible client and tutorial uses, not our prefix:
# an operator who already exports them for other tools need not repeat them.
ENV_NAMES = {"openai_base_url": "OPENAI_BASE_URL", "openai_api_key": "OPENAI_API_KEY"}


def env_name(field: str) -> str:
    """The environment variable a settings field is read from."""
    return ENV_NAMES.get(field, ENV_PREFIX + field.upper())


class SettingsError(ValueError):
    """A setting from the environment has an invalid value; the message names the variable."""


class Settings(BaseModel):
    # protected_namespaces=(): the model_* settings name the language model, not pydantic's model_ API.
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    bootstrap_servers: str = Field("", description="Kafka bootstrap servers; empty: embedded broker")
    database_url: str = Field("", description="PostgreSQL URL; empty starts embedded PostgreSQL")
    sandbox_url: str = Field("", description="Base URL of the SaaS sandbox; empty starts it")
    # Fixed ports for what the embedded stack starts: every `up` serves the same addresses, so a process
    # started by hand beside it (`streamagent tool crm`) reconnects when the stack comes back, instead of
    # dialling the last stack's random port for ever. 8470 (the page), 8471, 8472: one uncommon block on
    # loopback, clear of Kafka's 9092 and the usual dev servers. 0 picks a free port at each start
    # (tests that run several stacks at once).
    broker_port: int = Field(8471, ge=0, le=65535, description="Port of the embedded broker; 0 picks a free one")
    sandbox_port: int = Field(8472, ge=0, le=65535, description="Port of the stack's SaaS sandbox; 0 picks a free one")
    # The sandbox (tools/sandbox) stands in for the SaaS APIs: its initial faults, as JSON {api: spec},
    # and the seed of its random faults, so that a faulty run can be reproduced.
    sandbox_faults: str = Field("", description='Sandbox faults at start, JSON {"api": spec}')
    sandbox_seed: int = Field(0, description="Seed of the sandbox's random faults")
    topic_prefix: str = Field("", description="Prefix for every topic and group id (test isolation)")
    # 4, not more, on the embedded broker: every fetch pays for every partition it names, and one
    # process per processor gains no parallelism from more (measured: bench/README.md).
    partitions: int = Field(4, ge=1, description="Partition count for topics created by `topics create`")
    data_dir: Path = Field(Path(".streamagent"), description="Where the embedded stack keeps its files")
    # The embedded broker keeps its log in memory; "journal" puts a proxy in front of it that journals
    # every acknowledged batch and committed offset under data_dir and restores them on start.
    broker_storage: Literal["journal", "memory"] = Field("journal", description="Embedded broker storage")
    broker_fsync: bool = Field(True, description="fsync the broker journal before acknowledging (power-cut safe)")

    # Client tuning. The embedded broker answers a fetch only after half its max wait, and joins
    # a group after half the session timeout, so both are short here; production sets Kafka's
    # defaults through the environment.
    # 50 ms: a hop costs ~25 ms on the embedded broker, and an idle stack polls at ~40% of a core
    # instead of ~115% at 10 ms; under load batches are large either way.
    fetch_wait_ms: int = Field(50, ge=1)
    session_timeout_ms: int = Field(6000, ge=1000)
    # 500 ms: a member learns of a rebalance (a join, a leave, an expired session) within half a second;
    # the broker's cost is unmeasurable (8 idle consumers: 9.2-9.4% of a core at 500 and at 1000 ms).
    heartbeat_interval_ms: int = Field(500, ge=100)
    # How a consumer group splits its partitions (the confluent-kafka members; faust uses its own).
    # Incremental cooperative assignment moves only the partitions that change owner, but on the embedded
    # broker its second round never comes: the member giving partitions up revokes them and the joining
    # member is never assigned them (measured; docs/production/scaling.md). So the embedded default is
    # eager (roundrobin: every rebalance stops the whole group briefly); compose sets cooperative-sticky.
    kafka_assignment_strategy: Literal["roundrobin", "range", "cooperative-sticky"] = Field(
        "roundrobin", description="partition.assignment.strategy of the confluent-kafka consumer groups"
    )
    # Static group membership: a restarted process that comes back under the same instance id
    # takes its partitions back without waiting for its dead predecessor's session to expire.
    group_instance_id: str = Field("", description="Kafka group.instance.id; empty: dynamic membership")
    # This member's name within its groups (``up`` gives each member process its own: processor-decision-2):
    # what `streamagent status` shows, and the identity the state processor's members go by. Empty:
    # host-pid.
    instance_id: str = Field("", description="This member's name in `streamagent status`; empty: host-pid")
    # Scale-out: how many members of each group `up` and the stack run (comma-separated group=count:
    # intake, memory, state, decision, projection, tools = every tool, or one tool by its name).
    stack_members: str = Field("", description="Members per group `up` runs, e.g. state=2,decision=2,tools=2,jira=3")
    # `up` and the stack fork their processes from one that imported the project once (prefork.py): a
    # start or restart then costs ~30 ms instead of 0.3-1 s of CPU. False: each is a fresh interpreter.
    stack_prefork: bool = Field(True, description="Start the dev stack's processes from a fork server")
    # Every member announces its partitions and lag on the members topic at each rebalance and this often.
    member_report_s: float = Field(5.0, gt=0, description="How often a member announces its partitions and lag")
    member_silent_reports: int = Field(3, ge=1, description="Missed announcements: then status shows a member gone")
    max_event_bytes: int = Field(512 * 1024, ge=1, description="Larger events are dead-lettered")
    # The state processor's group alone: the embedded broker holds both JoinGroup and SyncGroup for half
    # the session timeout (measured), so a state member owns its partitions a whole session timeout
    # after it asks. Apache Kafka refuses less than group.min.session.timeout.ms (6000 by default).
    state_session_timeout_ms: int = Field(0, ge=0, description="State group's session timeout; 0: session_timeout_ms")
    # An ended run leaves the state table this long after its end (a tombstone in the changelog), so a
    # takeover recovers runs in flight, not history. Events of a run after that are dead-lettered.
    state_retention_s: float = Field(3600.0, ge=0, description="Ended runs leave the state table after this; 0: never")
    # Per owned partition, the table's runs and the changelog offset they cover, written this often to
    # the checkpoint topic; recovery loads the last one and reads the changelog after it only. 20 s: a
    # member taking over a killed member's partitions reads a third of what 60 s left (the state group's
    # kill -9 pause 9.8 s against 11.1-11.4 s in bench/scale.py), for 3% more broker bytes in that bench.
    state_checkpoint_interval_s: float = Field(20.0, ge=0, description="State table checkpoint interval; 0: never")

    # Kafka security and replication, for a secured or managed cluster (the embedded broker is PLAINTEXT
    # with one replica). Clients take them through streamagent.kafka.client_config (confluent) and
    # faust_compat.broker_credentials (faust). Empty strings mean "not set"; secrets print as **********.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (SASL_* protocols only)"
    )
    kafka_sasl_username: str = Field("", description="SASL username (SASL_* protocols only)")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (never logged)")
    kafka_ssl_ca_location: str = Field("", description="CA bundle (PEM) that signs the brokers; empty: system CAs")
    kafka_ssl_certificate_location: str = Field("", description="Client certificate (PEM), mutual TLS")
    kafka_ssl_key_location: str = Field("", description="Client private key (PEM), mutual TLS")
    kafka_ssl_key_password: SecretStr = Field(SecretStr(""), description="Password of the client key (never logged)")
    replication_factor: int = Field(1, ge=1, description="Replicas of every topic created; 3 on a real cluster")

    # Command signing (streamagent.signing): the decision processor signs every tool command with the
    # first key, tools accept a command signed with any listed key (two at once while a key rotates).
    # Read by the decision processor and the tools only; the embedded stack creates the default file.
    command_keys_file: Path | None = Field(
        None, description="File of command signing keys, `key_id secret` per line; empty: <data dir>/command-keys"
    )
    command_keys: SecretStr = Field(
        SecretStr(""), description="Command signing keys inline (lines or `;`-separated); replaces the file"
    )
    # Event authentication (streamagent.authn): a process outside the pipeline's core (intake, a tool)
    # signs with one role key derived from the pipeline keys; operators sign approvals with theirs.
    role_keys_file: Path | None = Field(
        None,
        description="This process's role key (`streamagent keys issue ROLE`); empty: derived from the command keys",
    )
    operator_keys_file: Path | None = Field(
        None, description="The operator key `approve`/`deny` sign with; empty: <data dir>/keys/operator.keys"
    )
    # Governance (streamagent.policy, processors/guard): policy files, and the approval token keys
    # (streamagent.approval), a key set apart from the command keys; `up` creates the default file.
    policies_dir: Path = Field(DEFAULT_POLICIES_DIR, description="Folder of policy files (*.toml)")
    policy_reload_s: float = Field(1.0, ge=0, description="How often a process looks for an edited policy file")
    environment: str = Field("dev", min_length=1, description="Name of this deployment, matched by policy rules")
    approval_keys_file: Path | None = Field(
        None, description="File of approval token keys, `key_id secret` per line; empty: <data dir>/approval-keys"
    )
    approval_keys: SecretStr = Field(SecretStr(""), description="Approval token keys inline; replaces the file")
    decider: Decider = Field("rules", description="Which decider the decision processor uses: rules | llm")
    # The model (processors/decision/llm): any OpenAI-compatible chat-completions endpoint.
    openai_base_url: str = Field("", description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    openai_api_key: SecretStr = Field(SecretStr(""), description="API key of the endpoint (never logged)")
    openai_api_key_file: Path | None = Field(None, description="File holding the API key; replaces OPENAI_API_KEY")
    model: str = Field("gpt-4o-mini", description="Model name sent with every chat completion")
    model_timeout_s: float = Field(30.0, gt=0, description="HTTP timeout of one model call")
    # The draft tool (tools/draft.py) asks the same endpoint; a cheaper model often writes a mail as well.
    draft_model: str = Field("", description="Model the draft tool asks; empty: STREAMAGENT_MODEL")
    model_max_retries: int = Field(3, ge=0, description="Retries of a model call on 429/5xx/timeout/connection error")
    # The whole of one decision (every attempt, backoff and the repair turn; not the planner, which has its
    # own timeout): past it the workflow's fallback decides, so a slow model never holds a run for longer.
    model_decision_timeout_s: float = Field(
        120.0, gt=0, description="Time one model decision may take in all (retries, repair turn), then the fallback"
    )
    model_answer_style: AnswerStyle = Field(
        "tools", description="tools (tool calling) | json_schema | json_object (llama-cpp-python's server)"
    )
    model_tool_choice: ToolChoice = Field("required", description="tool_choice of the tools style: required | auto")
    # A bound on one answer's length: a model answering in prose instead of a call (no grammar holds it)
    # would otherwise write until its context is full, and a local server keeps going after we give up.
    model_max_tokens: int = Field(0, ge=0, description="max_tokens of an executor call; 0: not sent (endpoint default)")
    # A decision waits seconds for a model: the runs of one batch are decided at once, up to this many.
    model_concurrency: int = Field(8, ge=1, description="Model calls one decision processor makes at once")
    model_context_tokens: int = Field(6000, ge=500, description="Token budget of the prepared context")
    model_prices: str = Field(
        "", description='Price table, JSON {"model": {"prompt": usd_per_1k, "completion": usd_per_1k}}'
    )
    # The planner: an optional (stronger) model that writes a short plan once per run, which the
    # executor (the model above) follows step by step. Empty endpoint settings reuse the executor's.
    planner: bool = Field(False, description="Plan each model-decided run once at its start (a workflow may override)")
    planner_model: str = Field("", description="Model name of the planner; empty: the executor's (STREAMAGENT_MODEL)")
    planner_base_url: str = Field("", description="OpenAI-compatible endpoint of the planner; empty: OPENAI_BASE_URL")
    planner_api_key: SecretStr = Field(SecretStr(""), description="Planner endpoint's API key; empty: the executor's")
    planner_timeout_s: float = Field(60.0, gt=0, description="HTTP timeout of one planner call")
    plan_max_chars: int = Field(2000, ge=100, description="Longest plan kept (cut, marked)")
    # Per-run spending caps of model-decided runs (a workflow may set its own); 0: no cap.
    max_tokens_per_run: int = Field(0, ge=0, description="Model tokens one run may spend; 0: no cap")
    max_cost_usd_per_run: float = Field(0.0, ge=0, description="Model cost in USD one run may spend; 0: no cap")
    # Which tools `up` and `demo` start: a comma-separated list of tool names, "all" for every tool the
    # tools package provides; empty: the tools the default workflow uses. Others deploy on their own
    # (`streamagent tool NAME`) into a running stack.
    stack_tools: str = Field(
        "", description="Tools `up` starts (comma-separated, or all); empty: the default workflow's"
    )
    # Several folders (a team's own beside the shipped ones) are joined by os.pathsep, as in PATH; a workflow
    # named in two of them is refused (processors/workflow.py load_workflows), never silently shadowed.
    workflows_dir: Path = Field(
        DEFAULT_WORKFLOWS_DIR, description="Folder(s) of workflow files (*.toml); several: separated by `:`"
    )
    # A tool from another package calls its own team's API, not the SaaS sandbox: its base URL by tool name.
    # One variable for every process, so the same environment deploys twenty tools; a tool not named here
    # calls sandbox_url.
    tool_urls: str = Field("", description='Base URL of a tool\'s API by tool name, JSON {"tool": "https://..."}')
    run_deadline_s: float = Field(600.0, gt=0, description="Default deadline of a run")
    command_deadline_s: float = Field(120.0, gt=0, description="How long a tool may keep retrying a command")
    tool_timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of one tool call")
    # bench/load.py --instant-tools: the loop's own cost, set beside peers whose steps cost nothing.
    tools_instant: bool = Field(
        False, description="Benchmark only: tools' sandbox calls answered in-process, without HTTP"
    )
    # MCP servers whose tools `streamagent tool mcp --server NAME` deploys (docs/guides/mcp.md); unset:
    # mcp.toml in the data dir (not in the workflows folder: every *.toml there is read as a workflow).
    # The probe is how soon a server that went away is noticed.
    mcp_config: Path | None = Field(None, description="TOML file of MCP servers; unset: <data dir>/mcp.toml")
    mcp_probe_s: float = Field(2.0, gt=0, description="How often an MCP tool process checks its server is there")
    # The run timeline page (`streamagent ui`; `streamagent up` serves it too). A fixed port keeps its
    # address the same from one `up` to the next; loopback by default, since the page shows every
    # request's contact data and the prompts the model saw (read-only, no login).
    ui_port: int = Field(8470, ge=0, le=65535, description="Port of the run timeline page; 0: `up` serves none")
    ui_host: str = Field("127.0.0.1", description="Address the run timeline page listens on")
    ui_poll_s: float = Field(1.0, gt=0, description="How often the open page refreshes runs and the timeline")
    # The hot path: how much work moves per round trip, and how much may be in flight.
    batch_size: int = Field(500, ge=1, description="Most messages a processor takes per poll (one DB round trip each)")
    linger_ms: int = Field(5, ge=0, description="Producer linger: few, large record batches keep partitions short")
    max_running_runs: int = Field(
        1000,
        ge=0,
        description="Runs in flight per stack (split over partitions); more wait, admitted in order; 0: no bound",
    )
    tool_max_in_flight: int = Field(256, ge=1, description="Commands one tool process works on at once")
    # Waiting runs are woken from the decision layer's table in pages of this many per tick (between
    # two polls), so a tool that appears with 100,000 runs waiting for it does not stall the processor.
    wake_batch: int = Field(500, ge=1, description="Most waiting runs the decision processor wakes per tick")
    # Re-drive: a command is re-sent only on evidence that it is lost (its tool's group consumed past
    # it and no result came), checked first this long after dispatch, then with doubling backoff.
    redrive_check_s: float = Field(5.0, gt=0, description="First loss check of an in-flight command after dispatch")
    redrive_check_max_s: float = Field(60.0, gt=0, description="Cap of the loss check's backoff")
    redrive_max: int = Field(3, ge=0, description="Re-sends of a lost command before its step fails")
    # The live tool catalogue: every tool process re-announces itself this often on the registry topic;
    # a member unheard of for registry_lease_heartbeats intervals is gone (its tool unavailable if none is left).
    registry_heartbeat_s: float = Field(5.0, gt=0, description="How often a tool process re-announces itself")
    registry_lease_heartbeats: int = Field(3, ge=1, description="Missed heartbeats after which a tool member is gone")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port of this process; 0 picks a free one")
    # librdkafka's statistics carry each partition's lag; parsed this often (0: off, no lag metric).
    consumer_lag_interval_s: float = Field(5.0, ge=0, description="How often consumers report their lag; 0: never")
    # OpenTelemetry spans go to this OTLP/HTTP endpoint (e.g. http://localhost:4318); empty: tracing off,
    # and the OpenTelemetry packages are not even imported (pip install -e '.[tracing]' to turn it on).
    otlp_endpoint: str = Field("", description="OTLP/HTTP endpoint for traces; empty: no tracing")
    log_level: LogLevel = Field("INFO", description="DEBUG | INFO | WARNING | ERROR | CRITICAL (any case)")
    log_format: LogFormat = Field("json", description="json | text")

    @field_validator("group_instance_id", "instance_id")
    @classmethod
    def _host_placeholder(cls, value: str) -> str:
        # ``decision-{host}``: replicas of one compose service (`--scale`) share their environment, and one
        # static id for all of them would fence each other; each container's hostname is its own and
        # survives a restart of that container, so each replica keeps a static identity of its own.
        if "{host}" in value:
            import socket

            return value.replace("{host}", socket.gethostname())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("model_prices")
    @classmethod
    def _prices_parse(cls, value: str) -> str:
        from streamagent.pricing import parse_prices

        parse_prices(value)  # refused at start, naming the variable, rather than at the first decision
        return value

    @field_validator("tool_urls")
    @classmethod
    def _tool_urls_parse(cls, value: str) -> str:
        parse_tool_urls(value)  # refused at start, naming the variable, rather than at a tool's first call
        return value

    def tool_url(self, tool: str) -> str:
        """The base URL ``tool`` calls: its own from ``tool_urls``, else the sandbox's."""
        return parse_tool_urls(self.tool_urls).get(tool, self.sandbox_url)

    @field_validator(
        "command_keys_file",
        "openai_api_key_file",
        "approval_keys_file",
        "role_keys_file",
        "operator_keys_file",
        "mcp_config",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An environment variable cannot hold None: empty means "not set" (``to_env`` writes it so).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_format", "decider", "model_answer_style", "model_tool_choice", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> Settings:
        """Refuse, naming the variables, what a Kafka client would only fail on later."""

        def var(name: str) -> str:
            return ENV_PREFIX + name.upper()

        protocol = self.kafka_security_protocol
        sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
        proto = f"{var('kafka_security_protocol')}={protocol}"
        user, password = var("kafka_sasl_username"), var("kafka_sasl_password")
        cert, key = var("kafka_ssl_certificate_location"), var("kafka_ssl_key_location")
        tls_set = {
            var("kafka_ssl_ca_location"): self.kafka_ssl_ca_location,
            cert: self.kafka_ssl_certificate_location,
            key: self.kafka_ssl_key_location,
            var("kafka_ssl_key_password"): self.kafka_ssl_key_password.get_secret_value(),
        }
        tls_set = {k: v for k, v in tls_set.items() if v}
        problems: list[str] = []
        if protocol != "PLAINTEXT" and not self.bootstrap_servers:
            problems.append(f"{proto} needs {var('bootstrap_servers')}: the embedded broker is PLAINTEXT only")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()):
            problems.append(f"{proto} needs {user} and {password}")
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password.get_secret_value()):
            problems.append(f"{user}/{password} set, but {proto} does not use SASL (SASL_SSL or SASL_PLAINTEXT)")
        if not tls and tls_set:
            problems.append(f"{', '.join(tls_set)} set, but {proto} does not use TLS (SSL or SASL_SSL)")
        if (cert in tls_set) != (key in tls_set):
            problems.append(f"{cert} and {key} go together (mutual TLS)")
        if var("kafka_ssl_key_password") in tls_set and key not in tls_set:
            problems.append(f"{var('kafka_ssl_key_password')} set without {key}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        # Two sources would leave which key signs to a precedence rule nobody remembers: refuse.
        if self.command_keys_file is not None and self.command_keys.get_secret_value():
            raise ValueError(
                f"{ENV_PREFIX}COMMAND_KEYS and {ENV_PREFIX}COMMAND_KEYS_FILE are both set; set one of them"
            )
        if self.approval_keys_file is not None and self.approval_keys.get_secret_value():
            raise ValueError(
                f"{ENV_PREFIX}APPROVAL_KEYS and {ENV_PREFIX}APPROVAL_KEYS_FILE are both set; set one of them"
            )
        if self.openai_api_key_file is not None and self.openai_api_key.get_secret_value():
            raise ValueError(
                f"{env_name('openai_api_key')} and {env_name('openai_api_key_file')} are both set; set one of them"
            )
        return self

    @model_validator(mode="after")
    def _llm_has_an_endpoint(self) -> Settings:
        # Refused here, so `up` stops before starting a decision processor that could only crash-loop.
        if self.decider == "llm" and not self.openai_base_url.strip():
            raise ValueError(
                f"{env_name('decider')}=llm needs {env_name('openai_base_url')}: the OpenAI-compatible endpoint"
                " to ask, e.g. https://api.openai.com/v1"
            )
        return self

    @property
    def command_keys_path(self) -> Path:
        """Where the command signing keys are read from when they are not given inline."""
        return self.command_keys_file if self.command_keys_file is not None else self.data_dir / "command-keys"

    @property
    def approval_keys_path(self) -> Path:
        """Where the approval token keys are read from when they are not given inline."""
        return self.approval_keys_file if self.approval_keys_file is not None else self.data_dir / "approval-keys"

    @property
    def mcp_config_path(self) -> Path:
        return self.mcp_config if self.mcp_config is not None else self.data_dir / "mcp.toml"

    @property
    def member_lease_s(self) -> float:
        """How long a member's announcement stays valid without a fresh one."""
        return self.member_report_s * self.member_silent_reports

    @property
    def state_session_ms(self) -> int:
        """The state group's session timeout: its own if set, else the common one."""
        return self.state_session_timeout_ms or self.session_timeout_ms

    @property
    def state_heartbeat_ms(self) -> int:
        """The state group's heartbeat: at most a third of its session, as Kafka advises, so a shortened
        state session keeps its heartbeats."""
        return min(self.heartbeat_interval_ms, self.state_session_ms // 3)

    @property
    def registry_lease_s(self) -> float:
        """How long a tool member's announcement stays valid without a fresh one."""
        return self.registry_heartbeat_s * self.registry_lease_heartbeats

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}streamagent.{name}"


def parse_tool_urls(text: str) -> dict[str, str]:
    """``tool_urls``: a JSON object of tool name to an http(s) base URL; raises ValueError saying what is wrong."""
    urls = json_object(text, "tool_urls", '{"tool": "https://..."}')
    for tool, url in urls.items():
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"tool_urls: the URL of tool {tool!r} must be an http:// or https:// URL, not {url!r}")
    return urls


def _from_env(environ: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for field in Settings.model_fields:
        key = env_name(field)
        if key in environ:
            values[field] = environ[key]
    return values


def _expected(field: str) -> str:
    """What a field accepts, in words, for error messages."""
    info = Settings.model_fields[field]
    choices = get_args(info.annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return "one of " + ", ".join(choices)
    kind = {int: "a whole number", float: "a number", Path: "a path", str: "text"}.get(info.annotation, "a value")
    bounds = []
    for meta in info.metadata:
        for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{word} {getattr(meta, attr)}")
    return kind + (" " + " and ".join(bounds) if bounds else "")


def _validate(values: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            if field not in Settings.model_fields:
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            name, value = env_name(field), values.get(field)
            if error["type"] == "value_error":  # a validator's own words say more than the field's type
                problems.append(f"{name}={value!r} is invalid: {str(error['msg']).removeprefix('Value error, ')}")
                continue
            problems.append(f"{name}={value!r} is invalid: expected {_expected(field)}")
        raise SettingsError("; ".join(problems)) from None


# Variables with the prefix that are not settings: the test suite's choice of broker and database.
_NOT_SETTINGS_PREFIXES = (ENV_PREFIX + "TEST_",)


def unknown_variables(environ: dict[str, str]) -> list[str]:
    """``STREAMAGENT_*`` variables that name no setting (a typo is otherwise ignored in silence), each
    with the nearest setting's name when one is close."""
    import difflib

    known = {env_name(field) for field in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(_NOT_SETTINGS_PREFIXES):
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        problems.append(f"{name} is not a setting" + (f" (did you mean {near[0]}?)" if near else ""))
    return problems


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; raises SettingsError naming every invalid or unknown variable."""
    environ = dict(os.environ)
    unknown = unknown_variables(environ)
    if unknown:
        raise SettingsError("; ".join(unknown) + " (docs/operations/configuration.md lists every setting)")
    return _validate(_from_env(environ))


def adopt_environ(environ: dict[str, str]) -> None:
    """Make ``environ`` this process's whole environment and forget the settings read from the one before
    (a process forked from the dev stack's fork server becomes the process it was asked to be)."""
    os.environ.clear()
    os.environ.update(environ)
    get_settings.cache_clear()


def settings_from(environ: dict[str, str]) -> Settings:
    """Settings for an explicit environment (child processes, tests)."""
    return _validate(_from_env(environ))


def to_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a child process (secrets included: not for logs)."""
    return {
        env_name(name): (
            "" if value is None else str(value.get_secret_value() if isinstance(value, SecretStr) else value)
        )
        for name, value in settings.model_dump().items()
    }


def child_environ(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child process: this one's (PATH, locale, ...), with ``settings`` written
    over it so the child reads exactly these, and ``extra`` variables (say, ``NO_COLOR``)."""
    return {**os.environ, **(to_env(settings) if settings is not None else {}), **extra}
