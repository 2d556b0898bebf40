"""The aiohttp application: ``/ws`` speaking the wire contract, and ``/healthz``.

The pool, the broker and the listener start and stop in ``cleanup_ctx``; on
shutdown every socket gets a close frame with code 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
from aiohttp import WSMsgType, web

from relay import admin, gcpolicy, heartbeat, logs, protocol, sessions
from relay.admission import Admission
from relay.auth import TokenRejected, TokenVerifier, load_public_key, new_socket_token, same_token
from relay.broker import Broker, BrokerError, create_broker
from relay.config import Settings
from relay.dbhub import DbHub, Position
from relay.dbjoin import JoinOptions, join_db
from relay.hub import SLOW_CLOSE_SECONDS, Hub, Socket
from relay.limits import socket_limits
from relay.listener import Listener
from relay.logsafe import clean
from relay.metrics import Counts
from relay.outbox import SendBudget
from relay.plans import DELETED, SUSPENDED, App, AppDirectory, AppsUnavailable
from relay.pool import Database
from relay.protocol import ClientFrame, CloseCode, InvalidToken, RelayError
from relay.schema import DEFAULT_APP

log = logging.getLogger("relay.ws")

# Frames above this are cut by aiohttp itself (close code 1009); frames between
# settings.max_frame_bytes and this get an error frame and the socket carries on.
# aiohttp buffers a whole message before handing it over, so this bounds the
# memory one socket can make the relay hold.
HARD_FRAME_LIMIT = 4 * 1024 * 1024
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-.:@/]+")  # always fullmatch: "$" admits a newline
DB_DELAYED = (
    "database unreachable: events on this channel are delayed; they will arrive when it is back"
)
DB_DOWN_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
# The listener reconnects from a blip within a fraction of a second; db-
# subscribers hear of an outage only when it lasts longer than this.
DB_OUTAGE_GRACE = 1.0
# Pruning a large log may take longer than an ordinary query.
PRUNE_TIMEOUT = 300.0
# How often a closing slow consumer's transport is checked for being gone.
LET_GO_POLL = 0.2
# The JavaScript client, served at /relay.js (an ES module; see relay.d.ts beside it).
RELAY_JS = Path(__file__).parent / "static" / "relay.js"


@dataclass
class RelayState:
    settings: Settings
    database_url: str
    verifier: TokenVerifier  # the default app's
    jwt_secret: str | None = None
    hub: Hub = field(init=False)
    admission: Admission = field(init=False)
    expiry: sessions.Expiry = field(init=False)
    dbhub: DbHub = field(default_factory=DbHub)
    broker: Broker = field(init=False)
    db: Database | None = None
    listener: Listener | None = None
    apps: AppDirectory | None = None
    per_app: dict[str, int] = field(default_factory=dict)
    db_outage: asyncio.TimerHandle | None = None  # an outage about to be announced
    db_announced: bool = False
    counts: Counts = field(default_factory=Counts)  # what /metrics reports

    def __post_init__(self) -> None:
        self.broker = create_broker(self.settings.broker_url, self._deliver)
        self.hub = Hub(self.broker, SendBudget(self.settings.send_queue_total_bytes))
        s = self.settings
        self.admission = Admission(
            timeout=s.auth_timeout_seconds,
            preauth_bytes=s.preauth_max_bytes,
            total=s.max_unauthenticated,
            per_app=s.max_unauthenticated_per_app,
            per_address=s.max_unauthenticated_per_address,
            grace=s.auth_grace_seconds,
        )
        self.expiry = sessions.Expiry(self.hub, self.dbhub, self.listener_position)

    def listener_position(self) -> Position:
        """What a live db- subscription has received so far."""
        return self.listener.position if self.listener is not None else Position(0)

    def _deliver(self, app_id: str, channel: str, data: str) -> None:
        self.hub.deliver(app_id, channel, data)

    def db_state_changed(self, connected: bool) -> None:
        """The listener's hook: on losing the database, tell each db- subscriber once."""
        if connected:
            if self.db_outage is not None:
                self.db_outage.cancel()
                self.db_outage = None
            if self.db_announced:
                self.db_announced = False
                log.info("database reachable again; db events resume")
            return
        if self.db_outage is None and not self.db_announced:
            loop = asyncio.get_running_loop()
            self.db_outage = loop.call_later(DB_OUTAGE_GRACE, self._announce_outage)

    def _announce_outage(self) -> None:
        self.db_outage = None
        self.db_announced = True
        told = 0
        for subs in self.dbhub.repos.values():
            channel = protocol.DB_CHANNEL_PREFIX + subs.repo
            for s in subs.members():
                s.reply("error", DB_DELAYED, channel=channel)
                told += 1
        log.warning("database unreachable; db events delayed subscriptions=%d", told)


STATE = web.AppKey("relay_state", RelayState)


def create_app(settings: Settings, database_url: str, jwt_secret: str | None) -> web.Application:
    verifier = TokenVerifier(
        secret=jwt_secret,
        public_key=settings.jwt_public_key,
        account_claim=settings.jwt_account_claim,
        # The default app takes tokens without 'aud', or naming it; with
        # RELAY_JWT_AUDIENCE set, only tokens naming that.
        audience=settings.jwt_audience or DEFAULT_APP,
        audience_required=settings.jwt_audience is not None,
        issuer=settings.jwt_issuer,
        max_ttl_seconds=settings.jwt_max_ttl_seconds,
    )
    state = RelayState(
        settings=settings, database_url=database_url, verifier=verifier, jwt_secret=jwt_secret
    )
    logs.forbid_secret(jwt_secret)
    logs.forbid_secret(settings.admin_token)
    # The HTTP server's own timeout from accepting a connection to a complete
    # request head (aiohttp's keep-alive timer, which also starts on connect);
    # handler_args apply to every runner of this app (``relay serve``, tests, benches).
    # No aiohttp access log (as ``relay serve`` always had): relay logs each
    # connection itself, and an access logger per connection is work in a storm.
    app = web.Application(
        handler_args={
            "keepalive_timeout": settings.request_head_timeout_seconds,
            "access_log": None,
        }
    )
    app[STATE] = state
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/relay.js", relay_js)
    admin.setup(app, state)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_sockets)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.db = await Database.connect(state.database_url)
    public_key = state.settings.jwt_public_key
    state.apps = AppDirectory(
        state.db,
        state.settings.max_connections,
        default_verifier=state.verifier,
        default_secret=None if public_key else state.jwt_secret,
        default_public_key=load_public_key(public_key) if public_key else None,
    )
    await state.broker.start()
    state.listener = Listener(
        state.database_url,
        state.dbhub,
        poll_seconds=state.settings.poll_seconds,
        busy_poll_seconds=state.settings.busy_poll_seconds,
        on_state=state.db_state_changed,
        on_events=state.counts.ingested,
        flusher=state.hub.budget.flusher,
    )
    await state.listener.start()
    chores = [
        asyncio.create_task(_prune_forever(state), name="relay-pruner"),
        asyncio.create_task(_check_apps_forever(state), name="relay-app-check"),
    ]
    if state.settings.heartbeat_seconds:
        beat = heartbeat.Heartbeat(state.settings.heartbeat_seconds)
        sockets = state.hub.sockets.values()
        chores.append(asyncio.create_task(beat.run(sockets), name="relay-heartbeat"))
    log.info("relay ready")
    with gcpolicy.serving():
        yield
    for chore in chores:
        chore.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chore
    await state.listener.stop()
    state.expiry.close()
    state.admission.close()
    if state.db_outage is not None:
        state.db_outage.cancel()
    await state.broker.close()
    await state.db.close()


async def _prune_forever(state: RelayState) -> None:
    """Keep the event log within its retention window (age and size)."""
    assert state.db is not None
    settings = state.settings
    while True:
        await asyncio.sleep(settings.prune_seconds)
        try:
            async with state.db.acquire() as conn:
                removed = await conn.fetchval(
                    "SELECT relay.prune(make_interval(secs => $1), $2)",
                    float(settings.event_retention_seconds),
                    settings.event_retention_rows,
                    timeout=PRUNE_TIMEOUT,
                )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
            log.warning("event log prune failed error=%s", type(err).__name__)
            continue
        if removed:
            log.info("event log pruned events=%d", removed)
            await _warn_if_pruned_unread(state.db)


async def _warn_if_pruned_unread(db: Database) -> None:
    """Say so when retention pruned ticks that a live listener had not read yet."""
    try:
        behind = await db.fetchval(
            "SELECT count(*) FROM relay.listeners l"
            " WHERE l.last_tick < (SELECT min(id) FROM relay.ticks)"
            " AND l.pid IN (SELECT pid FROM pg_stat_activity)"
        )
    except DB_DOWN_ERRORS:
        return
    if behind:
        log.error(
            "event log pruned past %d live listener(s): their subscribers are told to reload",
            behind,
        )


async def _check_apps_forever(state: RelayState) -> None:
    """Close the open sockets of apps suspended or deleted since they connected."""
    assert state.apps is not None
    while True:
        await asyncio.sleep(state.settings.app_check_seconds)
        open_apps = {s.app_id for s in state.hub.sockets.values()}
        if not open_apps:
            continue
        try:
            suspended = await state.apps.states(open_apps)
        except DB_DOWN_ERRORS as err:
            log.warning("app check failed error=%s", type(err).__name__)
            continue
        ended = {a: DELETED for a in open_apps if a not in suspended}
        ended.update({a: SUSPENDED for a, off in suspended.items() if off})
        ended.pop(DEFAULT_APP, None)  # it is not in the table only on a broken install
        if not ended:
            continue
        state.apps.forget()
        for socket in list(state.hub.sockets.values()):
            reason = ended.get(socket.app_id)
            if reason is not None:
                socket.reply("error", reason)
                socket.close(CloseCode.POLICY, reason.split(":")[0])
        log.warning("apps ended apps=%s", ",".join(sorted(ended)))


async def _close_sockets(app: web.Application) -> None:
    await app[STATE].hub.close_all(CloseCode.GOING_AWAY, "server shutting down")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves; 503 when its pool is wedged (restart it)."""
    state = request.app[STATE]
    listening = state.listener is not None and state.listener.connected.is_set()
    body: dict[str, object] = {
        "status": "ok",
        "sockets": len(state.hub.sockets),
        "listener": listening,
    }
    if state.db is not None:
        body["pool"] = state.db.stats()
        if state.db.wedged:
            body["status"] = "wedged"
            log.error("health check failed reason=pool-wedged pool=%s", body["pool"])
            return web.json_response(body, status=503)
    return web.json_response(body)


async def relay_js(request: web.Request) -> web.StreamResponse:
    """The JavaScript client. Module scripts are fetched with CORS, so any origin may load
    it (it is public code); revalidated on each load, so an upgraded relay serves its own."""
    return web.FileResponse(
        RELAY_JS,
        headers={
            "Content-Type": "text/javascript; charset=utf-8",
            "Access-Control-Allow-Origin": "*",
            "Cache-Control": "no-cache",
        },
    )


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    assert state.apps is not None
    public_key = request.headers.get("SB-PUBLIC-KEY") or request.query.get("pk") or ""
    app: App | None = None
    unavailable = False
    try:
        app = await state.apps.lookup(public_key)
    except AppsUnavailable:
        unavailable = True
    if app is not None and not app.allows_origin(request.headers.get("Origin")):
        log.info("origin refused app=%s", app.id)
        raise web.HTTPForbidden(text="origin not allowed for this app")

    # The relay's heartbeat watches TCP connections itself (relay.heartbeat); others get aiohttp's.
    beat = state.settings.heartbeat_seconds or None
    ws = web.WebSocketResponse(
        heartbeat=None if beat is None or heartbeat.watches(request.transport) else beat,
        max_msg_size=HARD_FRAME_LIMIT,
        compress=False,  # no permessage-deflate: see README, "Limits and plans"
    )
    await ws.prepare(request)
    if unavailable:
        log.warning("connection refused reason=apps-unavailable")
        await _refuse(
            ws,
            "service unavailable: cannot look up this app now, try again shortly",
            CloseCode.TRY_AGAIN_LATER,
        )
        return ws
    if app is None:
        await _refuse(ws, "unknown app: no app has this public key")
        return ws
    if app.suspended:
        log.info("connection refused app=%s reason=suspended", app.id)
        await _refuse(ws, SUSPENDED)
        return ws
    address = request.remote or ""
    open_now = state.per_app.get(app.id, 0)
    refusal = state.admission.make_room(app.id, address, app.max_connections, open_now)
    if refusal is not None:
        log.info("connection refused app=%s reason=%s", app.id, clean(refusal.text))
        await _refuse(ws, refusal.text, refusal.code)
        return ws

    settings = state.settings
    socket = Socket(
        ws,
        app.id,
        settings.send_queue_frames,
        queue_bytes=settings.send_queue_bytes,
        transport=request.transport,
        transport_protocol=request.protocol,
        limits=socket_limits(
            app.messages_per_second or settings.messages_per_second,
            settings.message_burst_seconds,
            settings.error_budget,
            settings.error_window_seconds,
        ),
        budget=state.hub.budget,
    )
    socket.counts = state.counts
    logs.bind(socket.id, app.id)
    state.counts.connected(app.id)
    state.per_app[app.id] = state.per_app.get(app.id, 0) + 1
    state.admission.add(socket, address, request.transport)
    state.hub.add(socket)
    socket.start()
    socket.send(protocol.encode("", "init", socket.id))
    log.info("connected sid=%s app=%s", socket.id, app.id)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await _handle(state, app, socket, msg.data)
            elif msg.type is WSMsgType.BINARY:
                _report(
                    state, socket, RelayError("binary frames are not supported: send JSON text")
                )
            elif msg.type is WSMsgType.ERROR:
                log.info("socket error sid=%s error=%s", socket.id, clean(ws.exception()))
                break
            if socket.closing:
                break
            del msg  # not held (with its text) while the socket idles
    finally:
        # The app counts the connection until its transport is gone (at once
        # after a clean close), not merely until the hub forgets the socket.
        counted = True
        try:
            state.admission.discard(socket)
            state.expiry.forget(socket)
            state.dbhub.unsubscribe_all(socket)
            if _gone(request.transport):
                state.per_app[app.id] -= 1
                counted = False
            try:
                await state.hub.remove(socket)
            finally:
                await socket.flush_and_close(CloseCode.GOING_AWAY, "")
                await _let_go(socket, request.transport)
        finally:
            if counted:
                state.per_app[app.id] -= 1
        log.info("disconnected sid=%s app=%s code=%s", socket.id, app.id, ws.close_code)
        logs.unbind(socket.id)
        logs.token_retired(socket.token)
    return ws


def _gone(transport: asyncio.Transport | None) -> bool:
    """Closed with nothing left to write: the descriptor goes in this loop turn."""
    return transport is None or (transport.is_closing() and not transport.get_write_buffer_size())


async def _let_go(socket: Socket, transport: asyncio.Transport | None) -> None:
    """Make sure the connection is gone: abort it if its peer is not reading.

    A graceful close waits for the peer to read what is buffered, so a dead or
    non-reading peer (a heartbeat timeout, a refused close handshake) would keep
    its file descriptor and buffers for ever. A slow consumer first gets its
    SLOW_CLOSE_SECONDS to read its backlog and close frame.
    """
    if transport is None:
        return
    if socket.close_code is CloseCode.SLOW_CONSUMER:
        # Reading its backlog closes it; hub._drop_if_unread aborts it otherwise.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOW_CLOSE_SECONDS + 1
        # No event tells that a transport has drained: poll, for this one case.
        while not _gone(transport) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(LET_GO_POLL)
    if not transport.is_closing() or transport.get_write_buffer_size():
        transport.abort()


async def _refuse(
    ws: web.WebSocketResponse, reason: str, code: CloseCode = CloseCode.POLICY
) -> None:
    await ws.send_str(protocol.encode("", "error", reason))
    await ws.close(code=code, message=reason.encode()[:120])


Handler = Callable[[RelayState, App, Socket, ClientFrame], Awaitable[None]]


async def _handle(state: RelayState, app: App, socket: Socket, raw: str) -> None:
    frame: ClientFrame | None = None
    try:
        frame = protocol.parse_frame(raw, state.settings.max_frame_bytes)
        state.counts.received(frame.type)
        # Malformed frames are metered by the error budget; well-formed ones by rate.
        socket.limits.check_rate()
        if frame.sid and frame.sid != socket.id:
            raise RelayError("sid does not match this socket: send your own socket id or none")
        handler = HANDLERS.get(frame.type)
        if handler is None:
            raise RelayError(
                f"unknown type {frame.type[:40]!r}: expected one of echo, auth, join, chan_in"
            )
        await handler(state, app, socket, frame)
    except RelayError as err:
        if frame is None:
            state.counts.received(None)
        _report(state, socket, err, frame)
    except BrokerError as err:
        log.warning("broker unavailable sid=%s error=%s", socket.id, clean(err))
        _report(
            state, socket, RelayError("channels unavailable: try again shortly"), frame, blame=False
        )
    except DB_DOWN_ERRORS as err:
        # Not the client's fault: reported, but not held against its error budget.
        what = "database unreachable" if not isinstance(err, OSError) else "unavailable"
        log.warning("request failed sid=%s error=%s", socket.id, type(err).__name__)
        _report(state, socket, RelayError(f"{what}: try again shortly"), frame, blame=False)


def _report(
    state: RelayState,
    socket: Socket,
    err: RelayError,
    frame: ClientFrame | None = None,
    blame: bool = True,
    channel: str = "",
) -> None:
    channel = channel or ((frame.channel or "") if frame else "")
    if frame is not None and frame.type == "join" and frame.data:
        channel = frame.data
    # Never echo a client's oversized channel name back (or into the log) whole.
    channel = channel[: state.settings.max_channel_name]
    socket.reply("error", err.message, channel=channel)
    state.counts.error(err.message)
    log.info(
        "client error sid=%s channel=%s error=%s", socket.id, clean(channel), clean(err.message)
    )
    spent = blame and socket.limits.spend_error(time.monotonic())
    if err.close_code is not None or spent:
        code = err.close_code or CloseCode.ABUSE
        log.warning("closing abusive socket sid=%s code=%s", socket.id, int(code))
        socket.close(code, "too many errors" if code is CloseCode.ABUSE else err.message)


def _require_auth(socket: Socket, frame: ClientFrame) -> None:
    if not same_token(socket.token, frame.token):
        raise InvalidToken()
    _require_session(socket)


def _require_session(socket: Socket) -> None:
    ident = socket.identity
    if ident is not None and ident.expires_at is not None and ident.expires_at < time.time():
        raise RelayError("session expired: send auth with a fresh session token")


async def on_echo(state: RelayState, app: App, socket: Socket, frame: ClientFrame) -> None:
    socket.reply("echo", "echo: " + (frame.data or ""))


async def on_auth(state: RelayState, app: App, socket: Socket, frame: ClientFrame) -> None:
    assert state.apps is not None
    try:  # the app as it is now: its keys may have changed since the socket connected
        current = await state.apps.lookup(app.public_key or "")
    except AppsUnavailable:
        current = app
    if current is None or current.id != app.id:
        raise RelayError(DELETED, close_code=CloseCode.POLICY)
    if current.verifier is None:
        log.info("auth refused sid=%s app=%s reason=no-key", socket.id, app.id)
        raise InvalidToken()
    try:
        identity = await current.verifier.verify_async(frame.data or "")
    except TokenRejected as err:
        log.info("auth refused sid=%s app=%s reason=%s", socket.id, app.id, err)
        raise InvalidToken() from None
    previous = socket.identity
    socket.identity = identity
    state.admission.authenticated(socket)
    logs.token_retired(socket.token)
    socket.token = new_socket_token()
    logs.token_issued(socket.token)
    if previous is not None and previous != identity:
        # Re-index db subscriptions under the new identity.
        for name in list(socket.channels):
            if protocol.is_db_channel(name):
                state.dbhub.reindex(socket, name[len(protocol.DB_CHANNEL_PREFIX) :])
    state.expiry.arm(socket)
    chat, paused = await sessions.resume(state.hub, socket)
    socket.reply("token", socket.token)
    for name in chat:  # channels paused when the previous session expired
        socket.reply("joined", name, channel=name)
    for name, (pos, row_filter) in paused.items():  # each resumes where it stopped
        options = JoinOptions(after=str(pos), filter=row_filter)
        try:
            await _join_db(state, socket, name, options, admit=lambda: _require_session(socket))
        except RelayError as err:
            _report(state, socket, RelayError(err.message), blame=False, channel=name)


def _check_channel_name(state: RelayState, name: str) -> None:
    limit = state.settings.max_channel_name
    if len(name) > limit:
        raise RelayError(f"channel name too long: {len(name)} characters, the limit is {limit}")
    if not CHANNEL_NAME.fullmatch(name):
        raise RelayError("channel name may contain only letters, digits and _ - . : @ /")


async def on_join(state: RelayState, app: App, socket: Socket, frame: ClientFrame) -> None:
    _require_auth(socket, frame)
    name = frame.data
    if not name:
        raise RelayError("join needs the channel name in 'data'")
    _check_channel_name(state, name)
    limit = app.max_channels_per_socket or state.settings.max_channels_per_socket
    if name not in socket.channels and len(socket.channels) >= limit:
        raise RelayError(f"too many channels: a socket may join at most {limit}")
    if protocol.is_db_channel(name):
        snapshot = frame.get("snapshot")
        if snapshot not in (None, "true", "false"):
            raise RelayError("'snapshot' must be \"true\" or absent")
        options = JoinOptions(
            after=frame.get("after"), snapshot=snapshot == "true", filter=frame.get("filter")
        )
        await _join_db(state, socket, name, options, admit=lambda: _require_auth(socket, frame))
        state.counts.joins["db"] += 1
        return
    await state.hub.join(socket, name, admit=lambda: _require_auth(socket, frame))
    socket.reply("joined", name, channel=name)
    state.counts.joins["chat"] += 1


async def _join_db(
    state: RelayState,
    socket: Socket,
    name: str,
    options: JoinOptions,
    admit: Callable[[], None],
) -> None:
    assert state.db is not None and state.listener is not None
    settings = state.settings
    options = replace(
        options,
        snapshot_limit=settings.snapshot_max_rows,
        stall_seconds=settings.replay_stall_seconds or None,
    )
    await join_db(state.db, state.listener, state.dbhub, socket, name, options, admit=admit)


async def on_chan_in(state: RelayState, app: App, socket: Socket, frame: ClientFrame) -> None:
    _require_auth(socket, frame)
    channel = frame.channel
    if not channel:
        raise RelayError("chan_in needs 'channel'")
    if protocol.is_db_channel(channel):
        raise RelayError("you cannot write to a database channel")
    if channel not in socket.channels:
        raise RelayError(f"not a member of {channel[:80]!r}: join it first")
    # "ok" first, as clients expect it before their own chan_out; if the broker
    # is unreachable an error frame follows, so the sender knows it was not sent.
    socket.reply("ok", channel=channel)
    await state.hub.publish(socket.app_id, channel, frame.data or "")


HANDLERS: dict[str, Handler] = {
    "echo": on_echo,
    "auth": on_auth,
    "join": on_join,
    "chan_in": on_chan_in,
}

__all__ = ["STATE", "RelayState", "create_app"]
