"""Kafka security and replication settings: validated at load, and mapped the same way into every client.

No broker: confluent clients are only constructed (librdkafka checks its keys and files then), and
faust's credentials are checked through faust's own mapping to aiokafka.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka import Consumer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from helpers import TEST_COMMAND_KEYS

from streamagent import faust_compat, kafka
from streamagent.config import Settings, SettingsError, settings_from, to_env

BOOTSTRAP = "broker1:9093,broker2:9093"
SASL = {
    "STREAMAGENT_BOOTSTRAP_SERVERS": BOOTSTRAP,
    "STREAMAGENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "STREAMAGENT_KAFKA_SASL_USERNAME": "agent",
    "STREAMAGENT_KAFKA_SASL_PASSWORD": "s3cret-pw",
}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate and its key, encrypted with "keypw" (also the CA file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "client.pem", d / "client.key"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "1", "-subj", "/CN=streamagent-test"]
    subprocess.run(
        ["openssl", "req", "-x509", *ec, "-keyout", str(key), "-out", str(cert), "-passout", "pass:keypw"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {
        "STREAMAGENT_KAFKA_SSL_CA_LOCATION": str(cert),
        "STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION": str(cert),
        "STREAMAGENT_KAFKA_SSL_KEY_LOCATION": str(key),
        "STREAMAGENT_KAFKA_SSL_KEY_PASSWORD": "keypw",
    }


def _settings(protocol: str, **env: str) -> Settings:
    return settings_from(
        {"STREAMAGENT_BOOTSTRAP_SERVERS": BOOTSTRAP, "STREAMAGENT_KAFKA_SECURITY_PROTOCOL": protocol, **env}
    )


# -- client_config ---------------------------------------------------------------------------------
def test_plaintext_is_the_default_and_adds_no_security_keys() -> None:
    settings = Settings(bootstrap_servers=BOOTSTRAP)
    assert kafka.client_config(settings) == {"bootstrap.servers": BOOTSTRAP, "security.protocol": "PLAINTEXT"}
    assert settings.replication_factor == 1


def test_ssl_maps_the_ca_alone_or_with_a_client_certificate(tls_files: dict[str, str]) -> None:
    ca_only = kafka.client_config(
        _settings("SSL", STREAMAGENT_KAFKA_SSL_CA_LOCATION=tls_files["STREAMAGENT_KAFKA_SSL_CA_LOCATION"])
    )
    assert ca_only == {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SSL",
        "ssl.ca.location": tls_files["STREAMAGENT_KAFKA_SSL_CA_LOCATION"],
    }
    mutual = kafka.client_config(_settings("SSL", **tls_files))
    assert mutual == {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SSL",
        "ssl.ca.location": tls_files["STREAMAGENT_KAFKA_SSL_CA_LOCATION"],
        "ssl.certificate.location": tls_files["STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION"],
        "ssl.key.location": tls_files["STREAMAGENT_KAFKA_SSL_KEY_LOCATION"],
        "ssl.key.password": "keypw",
    }
    # System CAs: no ssl.* key at all, librdkafka's own default.
    assert kafka.client_config(_settings("SSL")) == {"bootstrap.servers": BOOTSTRAP, "security.protocol": "SSL"}


def test_sasl_plaintext_maps_the_credentials_and_no_tls() -> None:
    assert kafka.client_config(_settings("SASL_PLAINTEXT", **SASL)) == {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "agent",
        "sasl.password": "s3cret-pw",
    }


def test_sasl_ssl_maps_credentials_and_tls(tls_files: dict[str, str]) -> None:
    conf = kafka.client_config(_settings("SASL_SSL", **SASL, **tls_files))
    assert conf["security.protocol"] == "SASL_SSL"
    assert (conf["sasl.mechanisms"], conf["sasl.username"], conf["sasl.password"]) == (
        "SCRAM-SHA-512",
        "agent",
        "s3cret-pw",
    )
    assert conf["ssl.key.location"] == tls_files["STREAMAGENT_KAFKA_SSL_KEY_LOCATION"]
    assert conf["ssl.key.password"] == "keypw"


def test_librdkafka_accepts_the_keys_and_files(tls_files: dict[str, str]) -> None:
    """A misspelt key or an unreadable key file fails here, at construction, without a broker."""
    for settings in (_settings("SASL_SSL", **SASL, **tls_files), _settings("SASL_PLAINTEXT", **SASL)):
        client = Consumer({**kafka.client_config(settings), "group.id": "unit", "log_level": 0})
        client.close()


def test_producer_consumer_admin_and_the_probe_all_take_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, dict[str, Any]] = {}

    class Capture:
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, conf: dict[str, Any]) -> Any:
            seen[self.name] = conf
            return _NoPartitions()

    for name in ("Producer", "Consumer", "AdminClient"):
        monkeypatch.setattr(kafka, name, Capture(name))
    monkeypatch.setattr(faust_compat, "Consumer", Capture("probe"))
    settings = _settings("SASL_PLAINTEXT", **SASL)
    kafka.producer(settings)
    kafka.consumer(settings, "decision")
    kafka.admin(settings)
    faust_compat.true_highwaters(settings, [("t", 0)], timeout_s=0.1)
    expected = kafka.client_config(settings)
    for name in ("Producer", "Consumer", "AdminClient", "probe"):
        assert expected.items() <= seen[name].items(), name


class _NoPartitions:
    def get_watermark_offsets(self, *_: Any, **__: Any) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        pass


def test_create_topics_uses_the_replication_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[Any] = []

    class FakeAdmin:
        def list_topics(self, timeout: float) -> Any:
            return type("Metadata", (), {"topics": {}})()

        def create_topics(self, new: list[Any], operation_timeout: float) -> dict[str, Any]:
            created.extend(new)
            return {}

    monkeypatch.setattr(kafka, "admin", lambda settings: FakeAdmin())
    kafka.create_topics(Settings(bootstrap_servers=BOOTSTRAP, replication_factor=3))
    assert created and {t.replication_factor for t in created} == {3}


# -- validation at load ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            ["STREAMAGENT_KAFKA_SASL_USERNAME", "STREAMAGENT_KAFKA_SASL_PASSWORD"],
        ),
        (
            {"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "STREAMAGENT_KAFKA_SASL_USERNAME": "agent"},
            ["STREAMAGENT_KAFKA_SASL_PASSWORD"],
        ),
        (
            {"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAMAGENT_KAFKA_SSL_KEY_LOCATION": "/k.pem"},
            ["STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION"],
        ),
        (
            {"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION": "/c.pem"},
            ["STREAMAGENT_KAFKA_SSL_KEY_LOCATION"],
        ),
        (
            {"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAMAGENT_KAFKA_SSL_KEY_PASSWORD": "pw"},
            ["STREAMAGENT_KAFKA_SSL_KEY_PASSWORD", "STREAMAGENT_KAFKA_SSL_KEY_LOCATION"],
        ),
        # Set but unused: almost always a forgotten protocol.
        ({"STREAMAGENT_KAFKA_SSL_CA_LOCATION": "/ca.pem"}, ["STREAMAGENT_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"]),
        ({"STREAMAGENT_KAFKA_SASL_USERNAME": "agent"}, ["STREAMAGENT_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"]),
        (
            {
                "STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                **SASL,
                "STREAMAGENT_KAFKA_SSL_CA_LOCATION": "/c",
            },
            ["STREAMAGENT_KAFKA_SSL_CA_LOCATION"],
        ),
        # The embedded broker speaks PLAINTEXT only.
        (
            {"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAMAGENT_BOOTSTRAP_SERVERS": ""},
            ["STREAMAGENT_BOOTSTRAP_SERVERS"],
        ),
        # Closed sets and bounds: the variable, and what it accepts.
        ({"STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "SASL"}, ["STREAMAGENT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"]),
        ({"STREAMAGENT_KAFKA_SASL_MECHANISM": "GSSAPI"}, ["STREAMAGENT_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"]),
        ({"STREAMAGENT_REPLICATION_FACTOR": "0"}, ["STREAMAGENT_REPLICATION_FACTOR", ">= 1"]),
    ],
)
def test_inconsistent_settings_are_refused_naming_the_variable(env: dict[str, str], named: list[str]) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from({"STREAMAGENT_BOOTSTRAP_SERVERS": BOOTSTRAP, **env})
    for name in named:
        assert name in str(caught.value)


def test_secrets_never_print_but_reach_child_processes(tls_files: dict[str, str]) -> None:
    settings = _settings("SASL_SSL", **SASL, **tls_files)
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert "s3cret-pw" not in text
        assert "keypw" not in text
    env = to_env(settings)
    assert env["STREAMAGENT_KAFKA_SASL_PASSWORD"] == "s3cret-pw"
    assert env["STREAMAGENT_KAFKA_SSL_KEY_PASSWORD"] == "keypw"
    assert settings_from(env) == settings


# -- faust ------------------------------------------------------------------------------------------
def test_faust_credentials_for_sasl_ssl(tls_files: dict[str, str]) -> None:
    credentials = faust_compat.broker_credentials(_settings("SASL_SSL", **SASL, **tls_files))
    assert isinstance(credentials, faust.SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("agent", "s3cret-pw")
    context = auth["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1  # the CA file, not the system store


def test_faust_credentials_for_the_other_protocols(tls_files: dict[str, str]) -> None:
    assert faust_compat.broker_credentials(Settings(bootstrap_servers=BOOTSTRAP)) is None
    sasl = credentials_to_aiokafka_auth(faust_compat.broker_credentials(_settings("SASL_PLAINTEXT", **SASL)))
    assert sasl["security_protocol"] == "SASL_PLAINTEXT" and sasl["ssl_context"] is None
    tls = faust_compat.broker_credentials(_settings("SSL", **tls_files))
    assert isinstance(tls, faust.SSLCredentials)
    assert credentials_to_aiokafka_auth(tls)["security_protocol"] == "SSL"


def test_a_wrong_key_password_fails_at_startup(tls_files: dict[str, str]) -> None:
    with pytest.raises(ssl.SSLError):
        faust_compat.broker_credentials(_settings("SSL", **{**tls_files, "STREAMAGENT_KAFKA_SSL_KEY_PASSWORD": "no"}))


def test_the_state_app_takes_credentials_and_replication_factor(
    monkeypatch: pytest.MonkeyPatch, tls_files: dict[str, str], tmp_path: Path
) -> None:
    from streamagent.processors.state import app as state_app

    monkeypatch.setattr(faust_compat, "apply", lambda settings: None)  # a process-wide patch; not for unit tests
    monkeypatch.setattr(state_app, "make_producer", lambda settings: object())
    settings = _settings(
        "SASL_SSL",
        **SASL,
        **tls_files,
        STREAMAGENT_REPLICATION_FACTOR="3",
        STREAMAGENT_DATA_DIR=str(tmp_path),
        STREAMAGENT_COMMAND_KEYS=TEST_COMMAND_KEYS,
    )
    app = state_app.build_app(settings)
    assert app.conf.topic_replication_factor == 3
    assert isinstance(app.conf.broker_credentials, faust.SASLCredentials)
    assert app.conf.broker_credentials.username == "agent"
