"""Settings: every knob of a relay process, read from the environment and the CLI.

The names of the environment variables are part of the operator interface
(DESIGN.md section 1) and keep their meaning across releases.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from relay.limits import ERROR_BUDGET, ERROR_WINDOW

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8099


class ConfigError(Exception):
    """A setting is missing or malformed; the message says which and how to fix it."""


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("relay"))


@dataclass
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_account_claim: str = "account_id"
    # The default app's expected 'iss' and 'aud' (None: 'iss' unchecked; 'aud'
    # may be absent or 'default').
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    broker_url: str = "memory://"
    max_connections: int | None = None
    migrate: bool = True
    # Input limits: a frame larger than this is refused with an error frame.
    max_frame_bytes: int = 256 * 1024
    max_channel_name: int = 200
    max_channels_per_socket: int = 100
    # Outgoing frames (and bytes) buffered for one socket before it counts as a
    # slow consumer and is closed with code 4001.
    send_queue_frames: int = 1000
    send_queue_bytes: int = 16 * 1024 * 1024
    # A resuming client that reads nothing of its replay for this long is cut
    # off as a slow consumer (0: never), so it cannot hold the replay open.
    replay_stall_seconds: float = 30.0
    # The most rows a snapshot join sends; over it the join is refused (use a filter).
    snapshot_max_rows: int = 10_000
    # Outgoing bytes queued for all sockets together (a body shared by many
    # sockets counts once); over it, the sockets with the biggest queues are cut (4001).
    send_queue_total_bytes: int = 256 * 1024 * 1024
    # Before auth: a socket must authenticate within auth_timeout_seconds (0: no
    # deadline) and may send at most preauth_max_bytes in all; unauthenticated
    # sockets are capped per process, per app and per remote address (0: no cap).
    # Over a cap (or the plan's connection cap), the oldest unauthenticated socket
    # of that scope connected for at least auth_grace_seconds makes room.
    auth_timeout_seconds: float = 10.0
    preauth_max_bytes: int = 64 * 1024
    max_unauthenticated: int = 10_000
    max_unauthenticated_per_app: int = 2000
    max_unauthenticated_per_address: int = 256
    auth_grace_seconds: float = 2.0
    # An HTTP request head (the /ws upgrade included) must arrive within this.
    request_head_timeout_seconds: float = 10.0
    # Frames a socket may send per second (0: unmetered), unless its app's plan
    # says otherwise; bursts of up to rate x burst seconds pass.
    messages_per_second: float = 100.0
    message_burst_seconds: float = 2.0
    # More errors than this within error_window_seconds close a socket (4000).
    error_budget: int = ERROR_BUDGET
    error_window_seconds: float = ERROR_WINDOW
    # A socket quiet for heartbeat_seconds is pinged; a peer silent since its ping is
    # dropped (1.5-2 intervals after its last data: relay/heartbeat.py; 0: no pings).
    heartbeat_seconds: float = 30.0
    # How long the listener waits for a wake-up before polling the event log anyway.
    poll_seconds: float = 1.0
    # While events flow the listener polls the log this often (latency vs database work).
    busy_poll_seconds: float = 0.001
    # Event log retention: by age and by size (None: no size cap); pruned every prune_seconds.
    event_retention_seconds: int = 24 * 3600
    event_retention_rows: int | None = 10_000_000
    prune_seconds: float = 60.0
    # How often open sockets are checked against their app (suspended or deleted).
    app_check_seconds: float = 5.0
    # The longest a session token may live from now (None: as long as its exp says).
    jwt_max_ttl_seconds: int | None = None
    # Bearer token for GET /admin/status (relay status); root tokens of the default app work too.
    admin_token: str | None = None
    # Log lines as readable text ("text") or one JSON object per line ("json").
    log_format: str = "text"
    # The inspector page at / may mint development tokens (only with a generated secret).
    dev_tokens: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        settings = cls()
        settings.host = env.get("RELAY_HOST") or DEFAULT_HOST
        settings.port = _int(env, "RELAY_PORT", DEFAULT_PORT)
        settings.database_url = env.get("RELAY_DATABASE_URL") or env.get("DATABASE_URL") or None
        if env.get("RELAY_DATA_DIR"):
            settings.data_dir = Path(env["RELAY_DATA_DIR"])
        settings.jwt_secret = env.get("RELAY_JWT_SECRET") or None
        settings.jwt_public_key = env.get("RELAY_JWT_PUBLIC_KEY") or None
        settings.jwt_account_claim = env.get("RELAY_JWT_ACCOUNT_CLAIM") or "account_id"
        settings.jwt_issuer = env.get("RELAY_JWT_ISSUER") or None
        settings.jwt_audience = env.get("RELAY_JWT_AUDIENCE") or None
        if env.get("RELAY_JWT_MAX_TTL"):
            settings.jwt_max_ttl_seconds = _duration(env, "RELAY_JWT_MAX_TTL")
        settings.broker_url = env.get("RELAY_BROKER_URL") or "memory://"
        if env.get("RELAY_MAX_CONNECTIONS"):
            settings.max_connections = _int(env, "RELAY_MAX_CONNECTIONS", 0)
        settings.max_frame_bytes = _int(env, "RELAY_MAX_FRAME_BYTES", settings.max_frame_bytes)
        if env.get("RELAY_EVENT_RETENTION"):
            settings.event_retention_seconds = _duration(env, "RELAY_EVENT_RETENTION")
        if env.get("RELAY_EVENT_RETENTION_ROWS"):
            rows = _int(env, "RELAY_EVENT_RETENTION_ROWS", 0)
            settings.event_retention_rows = rows or None
        settings.busy_poll_seconds = (
            _float(env, "RELAY_BUSY_POLL_MS", settings.busy_poll_seconds * 1000) / 1000
        )
        settings.heartbeat_seconds = _float(
            env, "RELAY_HEARTBEAT_SECONDS", settings.heartbeat_seconds
        )
        settings.messages_per_second = _float(
            env, "RELAY_MESSAGES_PER_SECOND", settings.messages_per_second
        )
        settings.message_burst_seconds = _float(
            env, "RELAY_MESSAGE_BURST_SECONDS", settings.message_burst_seconds
        )
        settings.error_budget = _int(env, "RELAY_ERROR_BUDGET", settings.error_budget)
        settings.send_queue_frames = _int(
            env, "RELAY_SEND_QUEUE_FRAMES", settings.send_queue_frames
        )
        settings.send_queue_bytes = _int(env, "RELAY_SEND_QUEUE_BYTES", settings.send_queue_bytes)
        settings.admin_token = env.get("RELAY_ADMIN_TOKEN") or None
        settings.log_format = (env.get("RELAY_LOG_FORMAT") or "text").lower()
        if settings.log_format not in ("text", "json"):
            raise ConfigError(
                f"RELAY_LOG_FORMAT must be text or json, got {env['RELAY_LOG_FORMAT']!r}"
            )
        settings.dev_tokens = _bool(env, "RELAY_DEV_TOKENS", settings.dev_tokens)
        settings.snapshot_max_rows = _int(
            env, "RELAY_SNAPSHOT_MAX_ROWS", settings.snapshot_max_rows
        )
        settings.replay_stall_seconds = _float(
            env, "RELAY_REPLAY_STALL_SECONDS", settings.replay_stall_seconds
        )
        for name, attr in _HARDENING:
            current = getattr(settings, attr)
            value = (_int if isinstance(current, int) else _float)(env, name, current)
            if value < 0:
                raise ConfigError(f"{name} must not be negative, got {env[name]!r}")
            setattr(settings, attr, value)
        return settings

    @property
    def secret_file(self) -> Path:
        return self.data_dir / "jwt-secret"

    def resolve_jwt_secret(self, create: bool) -> str | None:
        """Return the HS256 secret: configured, else stored in the data dir.

        With ``create`` a missing stored secret is generated (``relay serve``);
        without it (``relay token``) a missing one stays missing.
        """
        if self.jwt_secret or self.jwt_public_key:
            return self.jwt_secret
        if self.secret_file.exists():
            return self.secret_file.read_text().strip()
        if not create:
            return None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        return secret


# Limits on what clients can make the relay hold: (environment variable, attribute).
_HARDENING = (
    ("RELAY_SEND_QUEUE_TOTAL_BYTES", "send_queue_total_bytes"),
    ("RELAY_AUTH_TIMEOUT_SECONDS", "auth_timeout_seconds"),
    ("RELAY_PREAUTH_MAX_BYTES", "preauth_max_bytes"),
    ("RELAY_MAX_UNAUTHENTICATED", "max_unauthenticated"),
    ("RELAY_MAX_UNAUTHENTICATED_PER_APP", "max_unauthenticated_per_app"),
    ("RELAY_MAX_UNAUTHENTICATED_PER_ADDRESS", "max_unauthenticated_per_address"),
    ("RELAY_AUTH_GRACE_SECONDS", "auth_grace_seconds"),
    ("RELAY_REQUEST_HEAD_TIMEOUT_SECONDS", "request_head_timeout_seconds"),
)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _duration(env: Mapping[str, str], name: str) -> int:
    from relay.auth import parse_ttl

    try:
        return parse_ttl(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be a duration like 90s, 15m, 24h or 7d") from None
