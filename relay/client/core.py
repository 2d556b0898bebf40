"""The connection: one WebSocket to the relay that keeps itself, and its channels, alive.

Life of a connection: connect, ``init``, ``auth`` with a token from the
provider, ``token``, then one ``join`` per channel the program asked for (a
``db-`` channel resumes ``after`` its last position, a live view asks for a
snapshot the first time and after a reload notice), then frames flow. Frames
that need the socket token wait while an ``auth`` is in flight, so none is
sent with a token about to be replaced.

The session is renewed with a fresh token before its ``exp``; if it expires
anyway (the provider was slow), the relay pauses the channels and a fresh
``auth`` on the same socket resumes them: the relay sends ``joined`` for each
and replays the db events of the pause itself.

A lost connection is retried with jittered exponential backoff, forever,
until :meth:`Client.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from relay.client import _util
from relay.client.view import LiveView

log = logging.getLogger("relay.client")

TokenProvider = Callable[[], Awaitable[str] | str]
DB_PREFIX = "db-"


@dataclass(frozen=True, slots=True)
class Message:
    """A frame the relay sent on a channel: ``chan_out``, a db event, or a notice (``error``)."""

    type: str
    channel: str
    data: str
    pos: str = ""
    reason: str = ""

    def json(self) -> Any:
        return orjson.loads(self.data)


class Refused(Exception):
    """The relay answered a request with an ``error`` frame."""

    def __init__(self, channel: str, text: str) -> None:
        super().__init__(f"{channel}: {text}" if channel else text)
        self.channel = channel
        self.text = text


class Disconnected(Exception):
    """The connection was lost before the relay answered (the message may or may not
    have been delivered; chat is at most once)."""


@dataclass
class _Request:
    kind: (
        str  # "join" (sent by us), "resume" (the relay rejoins after a renewed session), "publish"
    )
    future: asyncio.Future[None] | None = None
    fields: dict[str, str] = field(default_factory=dict)  # a join's extra fields
    frame: dict[str, str] = field(default_factory=dict)  # a publish's frame, to send again


@dataclass
class _Channel:
    name: str
    view: LiveView | None = None
    pos: str = ""  # a plain db- channel's last position
    joined: bool = False  # on the current socket
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    outstanding: deque[_Request] = field(default_factory=deque)
    discard: int = 0  # replacing joins in flight: events before their `joined` are stale

    @property
    def is_db(self) -> bool:
        return self.name.startswith(DB_PREFIX)

    def join_fields(self) -> dict[str, str]:
        if self.view is not None:
            return self.view.join_fields()
        return {"after": self.pos} if self.is_db and self.pos else {}


@dataclass
class Stats:
    connections: int = 0  # sockets that got `init`
    auths: int = 0  # `token` frames received
    expiries: int = 0  # "session expired" notices
    snapshots_asked: int = 0
    resumes_asked: int = 0


class Client:
    """A reconnecting relay connection. Use :func:`connect` (``async with``)."""

    def __init__(
        self,
        url: str,
        token_provider: TokenProvider,
        *,
        public_key: str | None = None,
        heartbeat: float | None = 15.0,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        refresh_margin: float = 30.0,
        connect_timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url if "/ws" in url.split("://", 1)[-1] else url.rstrip("/") + "/ws"
        self._provider = token_provider
        self._headers = {"SB-PUBLIC-KEY": public_key} if public_key else {}
        self._heartbeat = heartbeat
        self._backoff = (backoff_base, backoff_max)
        self._margin = refresh_margin
        self._connect_timeout = connect_timeout
        self._http = session
        self._own_http = session is None
        self.stats = Stats()
        self.sid = ""
        self.connected = asyncio.Event()  # authenticated on a live socket
        self._channels: dict[str, _Channel] = {}
        self._listeners: dict[str | None, list[asyncio.Queue[Message | None]]] = {}
        self._state_callbacks: list[Callable[[str, str], None]] = []
        self._closed = False
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # per socket
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._out: asyncio.Queue[str] = asyncio.Queue()
        self._token = ""
        self._authing = False
        self._authed_here = False
        self._paused: set[str] | None = None  # channels the relay paused on expiry
        self._held: list[tuple[dict[str, str], _Channel, _Request]] = []
        self._auth_task: asyncio.Task[None] | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self._auth_waiters: list[asyncio.Future[None]] = []

    # --- public API ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="relay-client")

    async def close(self) -> None:
        self._closed = True
        self._closing.set()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for chore in list(self._chores):
            chore.cancel()
        closed = Disconnected("the client was closed")
        for _frame, _ch, request in self._held:
            _fail(request.future, closed)
        self._held = []
        for ch in self._channels.values():
            for waiter in ch.waiters:
                _fail(waiter, closed)
            ch.waiters.clear()
        for queues in self._listeners.values():
            for q in queues:
                q.put_nowait(None)
        if self._own_http and self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on_state(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        """``callback(event, detail)`` on "connected" (a socket authenticated, ``detail``
        its id), "authenticated" (every accepted auth, renewals included), "expired" (the
        session lapsed: channels paused until the renewal under way), "renewed" (resumed
        after that), "disconnected", "error" (an error frame about no channel, or the
        token provider failing) and "channel_error" (a channel given up)."""
        self._state_callbacks.append(callback)
        return lambda: self._state_callbacks.remove(callback)

    async def renew(self) -> None:
        """Authenticate again now, with a fresh token from the provider (say, after the
        user's claims changed); returns once the relay accepted it."""
        await self.connected.wait()
        waiter = asyncio.get_running_loop().create_future()
        self._auth_waiters.append(waiter)
        self._authenticate()
        await waiter

    async def join(self, channel: str) -> None:
        """Join ``channel`` and stay joined across reconnects (a ``db-`` channel resumes
        from its last position). Returns once joined; raises :class:`Refused`."""
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel(channel)
            self._send_join(ch)
        if ch.joined:
            return
        waiter = asyncio.get_running_loop().create_future()
        ch.waiters.append(waiter)
        await waiter

    async def live_view(
        self, channel: str, filter: str | None = None, *, id_column: str = "id"
    ) -> LiveView:
        """Follow a ``db-`` channel as a dict of rows; returns once the first snapshot is in."""
        if not channel.startswith(DB_PREFIX):
            raise ValueError("a live view follows a db- channel")
        if channel in self._channels:
            raise ValueError(f"{channel} is already joined by this client")
        view = LiveView(channel, filter, id_column)
        ch = self._channels[channel] = _Channel(channel, view=view)
        self._send_join(ch)
        try:
            await view.wait_first()
        except Exception:
            self._channels.pop(channel, None)
            raise
        return view

    async def publish(self, channel: str, data: str) -> None:
        """Send ``data`` to every member of ``channel``; returns on the relay's ``ok``.

        Waits while the connection is down; raises :class:`Disconnected` if it is lost
        after sending and before ``ok``, :class:`Refused` on an ``error``. A message the
        relay refused because the session had just expired is sent again once renewed.
        """
        ch = self._channels.get(channel)
        if ch is None:
            raise ValueError(f"join {channel!r} before publishing to it")
        future = asyncio.get_running_loop().create_future()
        frame = {"type": "chan_in", "channel": channel, "data": data}
        self._send_with_token(frame, ch, _Request("publish", future, frame=frame))
        await future

    def messages(self, channel: str | None = None) -> AsyncIterator[Message]:
        """Every frame on ``channel`` (every channel: None) from now on, until :meth:`close`."""
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._listeners.setdefault(channel, []).append(queue)
        return self._drain(channel, queue)

    async def _drain(
        self, channel: str | None, queue: asyncio.Queue[Message | None]
    ) -> AsyncIterator[Message]:
        try:
            while (msg := await queue.get()) is not None:
                yield msg
        finally:
            with contextlib.suppress(ValueError):
                self._listeners[channel].remove(queue)

    # --- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        assert self._http is not None
        attempt = 0
        while not self._closed:
            served = False
            try:
                # A handshake that neither completes nor fails (a relay stopping as it
                # accepted us) is given up after connect_timeout.
                ws = await asyncio.wait_for(
                    self._http.ws_connect(
                        self.url, headers=self._headers, heartbeat=self._heartbeat
                    ),
                    self._connect_timeout,
                )
                async with ws:
                    served = await self._serve(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                log.info("relay unreachable url=%s error=%s", self.url, type(err).__name__)
            finally:
                self._lost()
            if self._closed:
                return
            attempt = 0 if served else attempt + 1
            delay = _util.backoff_delay(attempt, *self._backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        self._ws = ws
        self._out = asyncio.Queue()
        writer = asyncio.create_task(self._write(ws, self._out))
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    try:
                        frame = orjson.loads(msg.data)
                    except orjson.JSONDecodeError:
                        log.warning("relay sent a frame that is not JSON")
                        continue
                    if isinstance(frame, dict):
                        self._on_frame(frame)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            writer.cancel()
        return self._authed_here

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, out: asyncio.Queue[str]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await ws.send_str(await out.get())

    def _lost(self) -> None:
        """The socket is gone: every request on it is lost, every channel must be rejoined."""
        was_connected = self.connected.is_set()
        self._ws = None
        self.connected.clear()
        self._token, self._authing, self._authed_here, self._paused = "", False, False, None
        if self._refresh is not None:
            self._refresh.cancel()
        if self._auth_task is not None:
            self._auth_task.cancel()
            self._auth_task = None
        for ch in self._channels.values():
            ch.joined, ch.discard = False, 0
            for request in ch.outstanding:
                _fail(request.future, Disconnected(f"connection lost before {ch.name} answered"))
            ch.outstanding.clear()
        # Held frames were never sent: publishes among them go out on the next socket.
        self._held = [h for h in self._held if h[2].kind == "publish"]
        if was_connected:
            self._tell("disconnected", "")

    # --- sending ----------------------------------------------------------------------------

    def _send_raw(self, frame: dict[str, str]) -> None:
        self._out.put_nowait(orjson.dumps(frame).decode())

    def _send_with_token(self, frame: dict[str, str], ch: _Channel, request: _Request) -> None:
        if not self._token or self._authing:
            self._held.append((frame, ch, request))
            return
        self._send_raw({**frame, "token": self._token})
        ch.outstanding.append(request)

    def _send_join(self, ch: _Channel) -> None:
        fields = ch.join_fields()
        log.debug(
            "join channel=%s fields=%s held=%s", ch.name, fields, not self._token or self._authing
        )
        if ch.joined or any(r.kind in ("join", "resume") for r in ch.outstanding):
            ch.discard += 1  # a replacing join on a subscribed socket
        if ch.view is not None:
            if "snapshot" in fields:
                self.stats.snapshots_asked += 1
            elif "after" in fields:
                self.stats.resumes_asked += 1
        self._send_with_token(
            {"type": "join", "data": ch.name, **fields}, ch, _Request("join", fields=fields)
        )

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for frame, ch, request in held:
            if request.kind == "join":
                if self._channels.get(ch.name) is ch:
                    self._send_join(ch)  # with the fields of now
            else:
                self._send_with_token(frame, ch, request)

    # --- authentication ------------------------------------------------------------------------

    def _authenticate(self) -> None:
        """Renew the session with a fresh token, unless a renewal is already under way."""
        if self._authing or self._ws is None:
            return
        if self._auth_task is None or self._auth_task.done():
            self._auth_task = asyncio.create_task(self._auth(), name="relay-client-auth")

    async def _auth(self) -> None:
        ws = self._ws
        try:
            token = self._provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception as err:
            log.warning("token provider failed error=%r", err)
            self._tell("error", f"token provider failed: {err!r}")
            if ws is not None and ws is self._ws:
                await ws.close()  # reconnect, with backoff, and ask again
            return
        if ws is None or ws is not self._ws or ws.closed:
            return
        self._authing = True
        self._send_raw({"type": "auth", "data": str(token)})
        self._expires_at = _util.token_expiry(str(token))

    _expires_at: float | None = None

    def _on_token(self, token: str) -> None:
        self._token, self._authing = token, False
        self.stats.auths += 1
        first = not self._authed_here
        self._authed_here = True
        paused, self._paused = self._paused, None
        if first:
            for ch in self._channels.values():
                self._send_join(ch)
        elif paused is not None:
            # The relay rejoins what it paused (`joined` for each, db events replayed);
            # what it did not hold is joined by us.
            for ch in self._channels.values():
                if ch.name in paused:
                    ch.outstanding.append(_Request("resume"))
                    if ch.view is not None and not ch.view.synced.is_set():
                        self._send_join(ch)  # paused mid-snapshot: take a new one
                elif not any(r.kind in ("join", "resume") for r in ch.outstanding):
                    self._send_join(ch)
            self._tell("renewed", "")
        if first or paused is not None:
            self._held = [h for h in self._held if h[2].kind != "join"]  # sent just now
        self._flush_held()
        if first:
            self.connected.set()
            self._tell("connected", self.sid)
        self._tell("authenticated", self.sid)
        waiters, self._auth_waiters = self._auth_waiters, []
        for waiter in waiters:
            _done(waiter)
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._expires_at is None:
            return
        delay = _util.refresh_delay(self._expires_at, self._margin)
        self._refresh = asyncio.get_running_loop().call_later(delay, self._authenticate)

    # --- receiving -------------------------------------------------------------------------------

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = str(frame.get("type", ""))
        data = str(frame.get("data", ""))
        name = str(frame.get("channel", ""))
        if kind == "init":
            self.sid = data
            self.stats.connections += 1
            self._authenticate()
        elif kind == "token":
            self._on_token(data)
        elif kind == "error":
            self._on_error(name, data, str(frame.get("reason", "")), str(frame.get("pos", "")))
        elif kind == "joined":
            self._on_joined(name, str(frame.get("pos", "")))
        elif kind == "ok":
            ch = self._channels.get(name)
            if ch is not None and (request := self._pop(ch, ("publish",))) is not None:
                _done(request.future)
        elif kind in ("db_created", "db_updated", "db_deleted", "db_synced"):
            self._on_db(kind, name, data, str(frame.get("pos", "")))
        elif kind == "chan_out":
            self._deliver(Message(kind, name, data))

    def _on_joined(self, name: str, pos: str) -> None:
        ch = self._channels.get(name)
        if ch is None:
            return
        request = self._pop(ch, ("join", "resume"))
        ch.joined = True
        if request is not None and request.kind == "join":
            if ch.discard:
                ch.discard -= 1
            if ch.view is not None:
                ch.view.joined(request.fields)
            elif ch.is_db and "after" not in request.fields:
                ch.pos = pos  # a fresh subscription starts here; a resume's replay follows
        for waiter in ch.waiters:
            if not waiter.done():
                waiter.set_result(None)
        ch.waiters.clear()

    def _on_db(self, kind: str, name: str, data: str, pos: str) -> None:
        ch = self._channels.get(name)
        if ch is None or ch.discard:
            return  # stale: a replacing join (a reload) is on its way
        if ch.view is not None:
            ch.view.apply(kind, data, pos)
        elif pos and kind != "db_synced":
            ch.pos = pos
        self._deliver(Message(kind, name, data, pos))

    def _on_error(self, name: str, text: str, reason: str, pos: str) -> None:
        if not name:
            if text.startswith(_util.SESSION_EXPIRED):
                self._expired()
            elif text == _util.INVALID_TOKEN and self._authing:
                log.warning("the relay refused the session token; reconnecting")
                self._tell("error", text)
                if self._ws is not None:
                    self._chore(self._ws.close())
            else:
                self._tell("error", text)
            return
        ch = self._channels.get(name)
        if reason or text.startswith(_util.DELAYED):
            self._notice(ch, name, text, reason, pos)
            return
        if ch is None:
            self._tell("channel_error", f"{name}: {text}")
            return
        request = self._pop(ch, ("join", "resume", "publish"))
        if request is not None and request.kind == "publish":
            if _session_lapsed(text):
                # Certainly not delivered: sent again once the session is renewed.
                self._held.append((request.frame, ch, request))
                self._authenticate()
            else:
                _fail(request.future, Refused(name, text))
            return
        self._join_failed(ch, request, text)

    def _join_failed(self, ch: _Channel, request: _Request | None, text: str) -> None:
        if request is not None and request.kind == "join" and ch.discard:
            ch.discard -= 1
        if _session_lapsed(text):
            # Sent around an expiry: joined again once the session is renewed.
            self._held.append(({"type": "join", "data": ch.name}, ch, _Request("join")))
            self._authenticate()
            return
        if _util.RELOAD in text:
            if ch.view is not None:
                ch.view.reload()
            ch.pos = ""
            self._deliver(Message("error", ch.name, text, reason="pruned"))
            self._send_join(ch)
            return
        if _util.is_retryable(text):
            self._chore(self._rejoin_later(ch))
            return
        # Refused for good (not a watched table, a bad filter, too many rows, ...).
        log.warning("join refused channel=%s error=%s", ch.name, text)
        self._channels.pop(ch.name, None)
        if ch.view is not None:
            ch.view.refused(text)
        for waiter in ch.waiters:
            _fail(waiter, Refused(ch.name, text))
        ch.waiters.clear()
        self._tell("channel_error", f"{ch.name}: {text}")

    async def _rejoin_later(self, ch: _Channel) -> None:
        await asyncio.sleep(_util.backoff_delay(2, *self._backoff))
        if self._channels.get(ch.name) is ch and self._ws is not None:
            self._send_join(ch)

    def _notice(self, ch: _Channel | None, name: str, text: str, reason: str, pos: str) -> None:
        if ch is not None and not ch.discard:
            if ch.view is not None:
                ch.view.apply("error", text, pos, reason)
            elif pos and reason == _util.TRUNCATED:
                ch.pos = pos
            if reason == _util.DROPPED:
                self._channels.pop(name, None)
            elif reason == _util.PRUNED:
                ch.pos = ""
                self._send_join(ch)  # reload: a new snapshot replaces the subscription
        self._deliver(Message("error", name, text, pos, reason))

    def _expired(self) -> None:
        log.debug("expired paused=%s", [c.name for c in self._channels.values() if c.joined])
        self.stats.expiries += 1
        self._paused = {ch.name for ch in self._channels.values() if ch.joined}
        for ch in self._channels.values():
            ch.joined = False
        self._tell("expired", "")
        self._authenticate()

    # --- helpers ----------------------------------------------------------------------------------

    def _pop(self, ch: _Channel, kinds: tuple[str, ...]) -> _Request | None:
        for request in ch.outstanding:
            if request.kind in kinds:
                ch.outstanding.remove(request)
                return request
        return None

    def _deliver(self, msg: Message) -> None:
        for key in (msg.channel, None):
            for queue in self._listeners.get(key, ()):
                queue.put_nowait(msg)

    def _tell(self, event: str, detail: str) -> None:
        for callback in list(self._state_callbacks):
            try:
                callback(event, detail)
            except Exception:
                log.exception("state callback failed event=%s", event)

    def _chore(self, aw: Awaitable[Any]) -> None:
        async def run() -> None:
            await aw

        task = asyncio.create_task(run())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)


def _session_lapsed(text: str) -> bool:
    return text.startswith(_util.SESSION_EXPIRED) or text == _util.INVALID_TOKEN


def _done(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None] | None, err: Exception) -> None:
    if future is not None and not future.done():
        future.set_exception(err)
        future.exception()  # a failure nobody awaits is not an "unretrieved" warning


def connect(
    url: str,
    token_provider: TokenProvider,
    public_key: str | None = None,
    **options: Any,
) -> Client:
    """``async with relay.client.connect(url, provider) as rc:`` — see :class:`Client`."""
    return Client(url, token_provider, public_key=public_key, **options)
