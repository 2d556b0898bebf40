"""docker-compose.yml and its proxy and Prometheus files agree with the relay's real settings.

Parsed, not run (no Docker here): the services exist, every ``RELAY_*``
variable they set is one relay reads, the health checks ask routes the relay
serves, the proxy and Prometheus reach the relays on the port they listen on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from relay.config import DEFAULT_PORT, Settings
from relay.server import create_app

ROOT = Path(__file__).resolve().parent.parent
RELAYS = ("relay-1", "relay-2")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def settings_env_names() -> set[str]:
    """Every environment variable relay reads (relay/config.py and the CLI)."""
    names: set[str] = set()
    for module in ("config.py", "cli.py"):
        names |= set(
            re.findall(r"\"(RELAY_[A-Z_]+|DATABASE_URL)\"", (ROOT / "relay" / module).read_text())
        )
    return names


def routes() -> set[str]:
    app = create_app(Settings(jwt_secret="x" * 32), "postgresql://unused/", "x" * 32)
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def test_services_volumes_and_dependencies():
    c = compose()
    services = c["services"]
    assert {"postgres", "redis", "proxy", "prometheus", *RELAYS} <= services.keys()
    assert {"pgdata", "promdata"} <= c["volumes"].keys()
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    for name in RELAYS:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no health check"


def test_relay_environment_names_are_real_settings():
    known = settings_env_names()
    assert {"RELAY_DATABASE_URL", "RELAY_BROKER_URL", "RELAY_ADMIN_TOKEN"} <= known
    for name in (*RELAYS, "migrate"):
        env = compose()["services"][name]["environment"]
        unknown = set(env) - known
        assert not unknown, f"{name} sets variables relay does not read: {unknown}"
    env = compose()["services"]["relay-1"]["environment"]
    assert env["RELAY_HOST"] == "0.0.0.0"  # reachable from the proxy
    assert int(env["RELAY_PORT"]) == DEFAULT_PORT
    assert env["RELAY_BROKER_URL"].startswith("redis://redis:")
    assert "@postgres:5432/" in env["RELAY_DATABASE_URL"]
    assert env["RELAY_LOG_FORMAT"] in ("text", "json")
    # The settings parse as relay parses them.
    parsed = Settings.from_env({k: str(v) for k, v in env.items()})
    assert parsed.port == DEFAULT_PORT and parsed.broker_url == env["RELAY_BROKER_URL"]


def test_health_checks_ask_routes_the_relay_serves():
    served = routes()
    assert {"/healthz", "/readyz", "/metrics"} <= served
    for name in RELAYS:
        check = " ".join(compose()["services"][name]["healthcheck"]["test"])
        paths = re.findall(r"127\.0\.0\.1:(\d+)(/\w+)", check)
        assert paths, check
        for port, path in paths:
            assert int(port) == DEFAULT_PORT and path in served
    proxy_check = " ".join(compose()["services"]["proxy"]["healthcheck"]["test"])
    assert re.search(r"/(healthz|readyz)\b", proxy_check)


def test_proxy_and_prometheus_reach_the_relays():
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    for name in RELAYS:
        assert f"server {name}:{DEFAULT_PORT}" in nginx
    assert "proxy_set_header Upgrade $http_upgrade" in nginx  # WebSockets pass through
    assert "location /ws" in nginx
    proxy = compose()["services"]["proxy"]
    assert any(v.startswith("./deploy/nginx.conf:") for v in proxy["volumes"])

    prom: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert set(job["static_configs"][0]["targets"]) == {f"{n}:{DEFAULT_PORT}" for n in RELAYS}
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./deploy/prometheus.yml:") for v in volumes)
