"""Settings.from_env: every environment variable the README documents, its default and its effect.

The names are part of the operator interface (DESIGN.md section 1): the test
reads them from the README, so a documented name without a case here fails.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigError, Settings

README = Path(__file__).parent.parent / "README.md"

# name -> (value set in the environment, Settings attribute, the value it must give)
CASES: dict[str, tuple[str, str, Any]] = {
    "RELAY_HOST": ("0.0.0.0", "host", "0.0.0.0"),
    "RELAY_PORT": ("9000", "port", 9000),
    "RELAY_DATABASE_URL": ("postgresql://a/relay", "database_url", "postgresql://a/relay"),
    "DATABASE_URL": ("postgresql://b/app", "database_url", "postgresql://b/app"),
    "RELAY_DATA_DIR": ("/srv/relay", "data_dir", Path("/srv/relay")),
    "RELAY_JWT_SECRET": ("s" * 40, "jwt_secret", "s" * 40),
    "RELAY_JWT_PUBLIC_KEY": ("/etc/relay/key.pem", "jwt_public_key", "/etc/relay/key.pem"),
    "RELAY_JWT_ACCOUNT_CLAIM": ("org", "jwt_account_claim", "org"),
    "RELAY_BROKER_URL": ("redis://r:6379/0", "broker_url", "redis://r:6379/0"),
    "RELAY_MAX_CONNECTIONS": ("250", "max_connections", 250),
    "RELAY_MAX_FRAME_BYTES": ("4096", "max_frame_bytes", 4096),
    "RELAY_EVENT_RETENTION": ("7d", "event_retention_seconds", 7 * 24 * 3600),
    "RELAY_EVENT_RETENTION_ROWS": ("5000", "event_retention_rows", 5000),
    "RELAY_HEARTBEAT_SECONDS": ("12.5", "heartbeat_seconds", 12.5),
    "RELAY_MESSAGES_PER_SECOND": ("7", "messages_per_second", 7.0),
    "RELAY_MESSAGE_BURST_SECONDS": ("3", "message_burst_seconds", 3.0),
    "RELAY_ERROR_BUDGET": ("42", "error_budget", 42),
    "RELAY_SEND_QUEUE_FRAMES": ("77", "send_queue_frames", 77),
    "RELAY_SEND_QUEUE_BYTES": ("65536", "send_queue_bytes", 65536),
    "RELAY_BUSY_POLL_MS": ("20", "busy_poll_seconds", 0.02),
    "RELAY_JWT_ISSUER": ("https://idp.example/", "jwt_issuer", "https://idp.example/"),
    "RELAY_JWT_AUDIENCE": ("chat-api", "jwt_audience", "chat-api"),
    "RELAY_JWT_MAX_TTL": ("12h", "jwt_max_ttl_seconds", 12 * 3600),
    "RELAY_REPLAY_STALL_SECONDS": ("5", "replay_stall_seconds", 5.0),
    "RELAY_SNAPSHOT_MAX_ROWS": ("500", "snapshot_max_rows", 500),
    "RELAY_AUTH_TIMEOUT_SECONDS": ("3", "auth_timeout_seconds", 3.0),
    "RELAY_AUTH_GRACE_SECONDS": ("1.5", "auth_grace_seconds", 1.5),
    "RELAY_PREAUTH_MAX_BYTES": ("8192", "preauth_max_bytes", 8192),
    "RELAY_MAX_UNAUTHENTICATED": ("50", "max_unauthenticated", 50),
    "RELAY_MAX_UNAUTHENTICATED_PER_APP": ("20", "max_unauthenticated_per_app", 20),
    "RELAY_MAX_UNAUTHENTICATED_PER_ADDRESS": ("5", "max_unauthenticated_per_address", 5),
    "RELAY_REQUEST_HEAD_TIMEOUT_SECONDS": ("4", "request_head_timeout_seconds", 4.0),
    "RELAY_SEND_QUEUE_TOTAL_BYTES": ("1048576", "send_queue_total_bytes", 1048576),
    "RELAY_ADMIN_TOKEN": ("a" * 32, "admin_token", "a" * 32),
    "RELAY_LOG_FORMAT": ("json", "log_format", "json"),
    "RELAY_DEV_TOKENS": ("1", "dev_tokens", True),
}

# The defaults the README states, for the same attributes.
DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8099,
    "database_url": None,  # embedded PostgreSQL
    "jwt_secret": None,  # generated in the data dir
    "jwt_public_key": None,
    "jwt_account_claim": "account_id",
    "broker_url": "memory://",
    "max_connections": None,  # unlimited
    "max_frame_bytes": 262144,
    "event_retention_seconds": 24 * 3600,
    "event_retention_rows": 10_000_000,
    "heartbeat_seconds": 30.0,
    "messages_per_second": 100.0,
    "message_burst_seconds": 2.0,
    "error_budget": 100,
    "send_queue_frames": 1000,
    "send_queue_bytes": 16 * 1024 * 1024,
    "busy_poll_seconds": 0.001,
    "migrate": True,
    "jwt_issuer": None,
    "jwt_audience": None,
    "jwt_max_ttl_seconds": None,
    "replay_stall_seconds": 30.0,
    "snapshot_max_rows": 10_000,
    "auth_timeout_seconds": 10.0,
    "auth_grace_seconds": 2.0,
    "preauth_max_bytes": 64 * 1024,
    "max_unauthenticated": 10_000,
    "max_unauthenticated_per_app": 2000,
    "max_unauthenticated_per_address": 256,
    "request_head_timeout_seconds": 10.0,
    "send_queue_total_bytes": 256 * 1024 * 1024,
    "admin_token": None,
    "log_format": "text",
    "dev_tokens": False,
}


def documented_names() -> set[str]:
    return set(re.findall(r"`((?:RELAY_[A-Z_]+)|DATABASE_URL)`", README.read_text()))


def test_every_documented_variable_has_a_case() -> None:
    names = documented_names()
    assert "RELAY_PORT" in names and "RELAY_SEND_QUEUE_BYTES" in names  # the README was read
    assert names - set(CASES) == set(), "documented in the README but not tested here"


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_env({})
    for attr, expected in DEFAULTS.items():
        assert getattr(settings, attr) == expected, attr
    assert settings.data_dir.name == "relay"  # the user data dir, e.g. ~/.local/share/relay


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_variable_sets_its_setting_and_nothing_else(name: str) -> None:
    value, attr, expected = CASES[name]
    settings = Settings.from_env({name: value})
    assert getattr(settings, attr) == expected
    baseline = Settings.from_env({})
    for other in DEFAULTS:
        if other != attr:
            assert getattr(settings, other) == getattr(baseline, other), other


def test_relay_database_url_wins_over_database_url() -> None:
    env = {"RELAY_DATABASE_URL": "postgresql://relay/x", "DATABASE_URL": "postgresql://app/y"}
    assert Settings.from_env(env).database_url == "postgresql://relay/x"
    assert Settings.from_env({"RELAY_DATABASE_URL": "", "DATABASE_URL": "postgresql://app/y"})


def test_empty_values_mean_the_default() -> None:
    settings = Settings.from_env(dict.fromkeys(CASES, ""))
    for attr, expected in DEFAULTS.items():
        assert getattr(settings, attr) == expected, attr


def test_zero_retention_rows_means_no_size_cap() -> None:
    assert Settings.from_env({"RELAY_EVENT_RETENTION_ROWS": "0"}).event_retention_rows is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RELAY_PORT", "eighty", "RELAY_PORT must be a whole number"),
        ("RELAY_MAX_CONNECTIONS", "lots", "RELAY_MAX_CONNECTIONS must be a whole number"),
        ("RELAY_SEND_QUEUE_BYTES", "1.5", "RELAY_SEND_QUEUE_BYTES must be a whole number"),
        ("RELAY_HEARTBEAT_SECONDS", "soon", "RELAY_HEARTBEAT_SECONDS must be a number"),
        ("RELAY_MESSAGES_PER_SECOND", "-1", "must not be negative"),
        ("RELAY_EVENT_RETENTION", "forever", "must be a duration like 90s, 15m, 24h or 7d"),
    ],
)
def test_malformed_values_are_readable_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env({name: value})


def test_the_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_PORT", "8123")
    assert Settings.from_env().port == 8123
