"""Operator endpoints: ``/metrics``, ``/readyz``, the admin status and the inspector page.

- ``GET /metrics``: Prometheus text format (see :mod:`relay.metrics`).
- ``GET /readyz``: 200 once the database answers, the broker answers (when one
  is configured) and the listener has caught up with the event log; 503 with
  the reasons otherwise. ``/healthz`` stays the liveness check.
- ``GET /admin/status``: a JSON summary for ``relay status`` and the inspector's
  admin view, for a bearer of the admin token (``RELAY_ADMIN_TOKEN``) or of a
  root session token of the default app (``relay token --root``).
- ``GET /``: the inspector, a plain HTML page (``relay/inspector/``); with
  ``RELAY_DEV_TOKENS`` (``relay serve --dev``) it can mint session tokens
  through ``POST /dev/token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.auth import TokenRejected, mint_token
from relay.metrics import RelayCollector, registry_for

if TYPE_CHECKING:
    from relay.server import RelayState

log = logging.getLogger("relay.admin")

CHECK_TIMEOUT = 2.0
# relay status shows rates over this window (seconds).
RATE_WINDOW = 10.0
TOP_CHANNELS = 10
SAMPLE_SECONDS = 1.0


def setup(app: web.Application, state: RelayState) -> None:
    """Add the operator routes to the relay's aiohttp app."""
    registry, collector = registry_for(state)
    ops = Operator(state, collector)
    app[OPS] = ops
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/admin/status", ops.status)
    app.cleanup_ctx.append(ops.sampling)
    ops.registry = registry
    app.router.add_get("/", inspector_page)
    app.router.add_get("/inspector/config", ops.inspector_config)
    app.router.add_get("/inspector/{name}", inspector_file)
    app.router.add_post("/dev/token", ops.dev_token)
    if state.settings.dev_tokens:
        log.warning(
            "development tokens enabled (RELAY_DEV_TOKENS): anyone who reaches this relay can"
            " mint session tokens at /dev/token; never enable this in production"
        )


INSPECTOR_DIR = Path(__file__).resolve().parent / "inspector"
INSPECTOR_FILES = {
    "inspector.js": "text/javascript",
    "inspector.css": "text/css",
}
# The page loads only its own script and style and talks only to this relay.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:;"
        " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DEV_TOKEN_TTL = 3600


async def inspector_page(request: web.Request) -> web.Response:
    body = (INSPECTOR_DIR / "index.html").read_bytes()
    return web.Response(body=body, content_type="text/html", headers=PAGE_HEADERS)


async def inspector_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kind = INSPECTOR_FILES.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    body = (INSPECTOR_DIR / name).read_bytes()
    return web.Response(body=body, content_type=kind, headers=PAGE_HEADERS)


class Operator:
    def __init__(self, state: RelayState, collector: RelayCollector) -> None:
        self.state = state
        self.collector = collector
        self.registry: Any = None
        # (monotonic time, events ingested, frames received, frames sent) samples for rates.
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=256)

    async def sampling(self, app: web.Application) -> AsyncIterator[None]:
        """Sample the counters every second, so rates are ready at the first status call."""
        task = asyncio.create_task(self._sample_forever(), name="relay-status-sampler")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _sample_forever(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    def _sample(self) -> tuple[float, int, int, int]:
        counts = self.state.counts
        now = time.monotonic()
        sample = (
            now,
            counts.events_ingested,
            sum(counts.frames_in.values()),
            sum(counts.frames_out.values()),
        )
        self._samples.append(sample)
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        return sample

    async def _db_ticks(self) -> tuple[int | None, int | None]:
        db = self.state.db
        if db is None:
            return None, None
        row = await asyncio.wait_for(
            db.fetchrow("SELECT min(id) AS oldest, max(id) AS newest FROM relay.ticks"),
            CHECK_TIMEOUT,
        )
        return (row["oldest"], row["newest"]) if row is not None else (None, None)

    async def refresh(self) -> list[str]:
        """Query what the collector cannot read synchronously; the problems found."""
        problems: list[str] = []
        try:
            self.collector.oldest_tick, self.collector.newest_tick = await self._db_ticks()
        except Exception as err:  # any failure to answer is "not reachable"
            problems.append(f"database unreachable ({type(err).__name__})")
        self.collector.broker_up = await self.state.broker.ping()
        if not self.collector.broker_up:
            problems.append("broker unreachable")
        listener = self.state.listener
        if listener is None or not listener.connected.is_set():
            problems.append("listener not connected")
        elif not listener.caught_up:
            problems.append("listener catching up with the event log")
        return problems

    async def metrics(self, request: web.Request) -> web.Response:
        await self.refresh()
        # In the loop's thread: the collector reads dicts the loop changes.
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = await self.refresh()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def inspector_config(self, request: web.Request) -> web.Response:
        return web.json_response({"dev_tokens": self._can_mint()})

    def _can_mint(self) -> bool:
        return self.state.settings.dev_tokens and bool(self.state.jwt_secret)

    async def dev_token(self, request: web.Request) -> web.Response:
        """Development mode only: a session token of the default app for any user."""
        if not self._can_mint():
            return web.json_response(
                {
                    "error": "development tokens are off: start relay with --dev (RELAY_DEV_TOKENS)"
                    " and its own HS256 secret, or paste a token from relay token"
                },
                status=403,
            )
        try:
            body = await request.json()
            user, account = str(body["user"]), str(body.get("account") or "")
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "send JSON {user, account, root}"}, status=400)
        if not user:
            return web.json_response({"error": "user must not be empty"}, status=400)
        assert self.state.jwt_secret is not None
        token = mint_token(
            self.state.jwt_secret,
            user,
            account,
            ttl_seconds=DEV_TOKEN_TTL,
            account_claim=self.state.settings.jwt_account_claim,
            root=bool(body.get("root")),
            audience=self.state.settings.jwt_audience,
        )
        log.info("development token minted root=%s", bool(body.get("root")))
        return web.json_response({"token": token})

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        expected = self.state.settings.admin_token
        if expected and hmac.compare_digest(given.encode(), expected.encode()):
            return True
        try:
            identity = self.state.verifier.check(given)
        except TokenRejected:
            return False
        return identity.is_root

    async def status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(
                {
                    "error": "admin token required: Authorization: Bearer <RELAY_ADMIN_TOKEN or a"
                    " root token of the default app>"
                },
                status=401,
            )
        problems = await self.refresh()
        return web.json_response(self.summary(problems))

    def summary(self, problems: list[str]) -> dict[str, Any]:
        state = self.state
        counts = state.counts
        sample = self._sample()
        first = self._samples[0]
        span = sample[0] - first[0]

        def rate(i: int) -> float:
            return round((sample[i] - first[i]) / span, 2) if span > 0 else 0.0

        members: dict[tuple[str, str], set[Any]] = getattr(state.hub, "_members", {})
        chat = [(app, name, len(m)) for (app, name), m in members.items()]
        db = [
            (subs.app, "db-" + subs.repo, len(subs.everyone)) for subs in state.dbhub.repos.values()
        ]
        top = sorted(chat + db, key=lambda c: -c[2])[:TOP_CHANNELS]
        listener = state.listener
        newest = self.collector.newest_tick
        last = listener.last_tick if listener is not None else None
        return {
            "status": "ready" if not problems else "not ready",
            "problems": problems,
            "sockets": dict(sorted(state.per_app.items())),
            "sockets_total": len(state.hub.sockets),
            "channels": {"chat": len(chat), "db": len(db)},
            "top_channels": [{"app": a, "channel": c, "members": n} for a, c, n in top],
            "listener": {
                "connected": listener is not None and listener.connected.is_set(),
                "tick": last,
                "newest_tick": newest,
                "lag_ticks": max(0, newest - last) if newest is not None and last else None,
            },
            "rates": {
                "window_seconds": round(span, 1),
                "events_per_second": rate(1),
                "frames_in_per_second": rate(2),
                "frames_out_per_second": rate(3),
            },
            "totals": {
                "events_ingested": counts.events_ingested,
                "frames_in": dict(counts.frames_in),
                "frames_out": dict(counts.frames_out),
                "errors": dict(counts.errors),
            },
            "pool": state.db.stats() if state.db is not None else None,
        }


OPS = web.AppKey("relay_operator", Operator)
