"""What the relay is doing, as Prometheus metrics (``GET /metrics``) and readiness.

The hot path (every frame in and out) counts in plain ints and dicts on a
:class:`Counts` object, one per relay; prometheus-client's own counters take
a lock per increment, which costs several times more per frame. A custom
collector (:class:`RelayCollector`) turns the counts, and the state the relay
already keeps (sockets per app, channels, the listener's position, the pool),
into metric families when Prometheus scrapes. ``bench/metrics_overhead.py``
measures what counting costs per frame.

Every label value is one of a fixed set (frame types, error reasons, close
codes) or an app id, so a client cannot grow the number of time series.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from relay.server import RelayState

FRAMES_IN = ("echo", "auth", "join", "chan_in")
FRAMES_OUT = (
    "init",
    "echo",
    "token",
    "joined",
    "ok",
    "chan_out",
    "error",
    "db_created",
    "db_updated",
    "db_deleted",
    "db_synced",
)
DB_FRAMES = ("db_created", "db_updated", "db_deleted")
# The first six characters after '{"sid":"<uuid>","type":"' (offset 54), by frame type.
_TYPE_AT_54 = {(t + '","')[:6]: t for t in FRAMES_OUT}
# The same six characters at offset 10 of a shared frame body ('","type":"<type>...').
_BODY_TYPE_AT_10 = {k.encode(): t for k, t in _TYPE_AT_54.items()}
# Commit-to-delivery latency buckets, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REASON_WORDS = re.compile(r"[a-z][a-z ]*")
MAX_REASONS = 64


class Buckets:
    """A histogram in plain ints: counts per upper bound, a sum and a count."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class Counts:
    """The relay's counters, bumped on the hot path; read by :class:`RelayCollector`."""

    def __init__(self) -> None:
        self.frames_in: dict[str, int] = dict.fromkeys((*FRAMES_IN, "invalid", "other"), 0)
        self.frames_out: dict[str, int] = dict.fromkeys((*FRAMES_OUT, "other"), 0)
        self.errors: dict[str, int] = {}
        self.closes: dict[int, int] = {}
        self.joins: dict[str, int] = {"chat": 0, "db": 0}
        self.connections: dict[str, int] = {}
        self.events_ingested = 0
        self.latency = Buckets(LATENCY_BUCKETS)

    def received(self, type_: str | None) -> None:
        key = "invalid" if type_ is None else type_ if type_ in FRAMES_IN else "other"
        self.frames_in[key] += 1

    def sent(self, text: str) -> None:
        """One frame written to a socket: its type read in place (no JSON parse).

        Server frames start ``{"sid":"<36-character socket id>","type":"<type>"``,
        so six characters at a fixed offset name the type; anything else (the
        ``init`` frame, with an empty sid) takes the slower way.
        """
        try:
            self.frames_out[_TYPE_AT_54[text[54:60]]] += 1
        except KeyError:
            pieces = text.split('"', 8)
            type_ = pieces[7] if len(pieces) > 7 else "other"
            self.frames_out[type_ if type_ in self.frames_out else "other"] += 1

    def sent_all(self, texts: list[str]) -> None:
        """:meth:`sent` for each of ``texts`` (one call for a write's frames)."""
        frames_out, at = self.frames_out, _TYPE_AT_54
        for text in texts:
            type_ = at.get(text[54:60])
            if type_ is None:
                self.sent(text)
            else:
                frames_out[type_] += 1

    def sent_body(self, data: bytes, sockets: int = 1) -> None:
        """One shared frame body (everything after the sid) written to ``sockets`` sockets."""
        try:
            self.frames_out[_BODY_TYPE_AT_10[data[10:16]]] += sockets
        except KeyError:
            frame = '{"sid":"' + "0" * 36 + data.decode(errors="replace")
            for _ in range(sockets):
                self.sent(frame)

    def error(self, message: str) -> None:
        reason = error_reason(message)
        if reason not in self.errors and len(self.errors) >= MAX_REASONS:
            reason = "other"
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def closed(self, code: int) -> None:
        if code != 1001:  # every socket ends with 1001 unless something cut it off
            self.closes[code] = self.closes.get(code, 0) + 1

    def connected(self, app: str) -> None:
        self.connections[app] = self.connections.get(app, 0) + 1

    def ingested(self, events: int, seconds: float) -> None:
        """``events`` dispatched by the listener, ``seconds`` after their commit at most."""
        self.events_ingested += events
        self.latency.observe(seconds, events)


# Closes that count as cuts, by close code.
CUTS = {4000: "abuse", 4001: "slow_consumer", 1009: "too_big"}


def error_reason(message: str) -> str:
    """A short, fixed label for an error text: the words before any detail.

    ``"rate limit: at most 100 ..."`` -> ``"rate limit"``; ``"not a member of 'x': ..."`` ->
    ``"not a member of"``; client-supplied names (quoted, or a ``db-`` channel) are cut off.
    """
    head = message.split(":", 1)[0].lower()
    head = head.split(" db-", 1)[0]
    found = _REASON_WORDS.match(head)
    return found.group(0).strip()[:40] if found else "other"


class RelayCollector(Collector):
    """Metric families built at scrape time from the relay's counts and state."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        # Refreshed by the /metrics handler before each scrape (an async query).
        self.newest_tick: int | None = None
        self.oldest_tick: int | None = None
        self.broker_up = True

    def collect(self) -> Iterator[Metric]:
        state = self.state
        counts = state.counts

        sockets = GaugeMetricFamily("relay_sockets", "Open WebSocket connections", labels=["app"])
        for app, n in sorted(state.per_app.items()):
            sockets.add_metric([app], n)
        yield sockets
        yield _counter(
            "relay_connections",
            "WebSocket connections accepted",
            "app",
            counts.connections,
        )
        yield _counter(
            "relay_frames_received", "Frames received, by type", "type", counts.frames_in
        )
        yield _counter(
            "relay_frames_sent", "Frames written to sockets, by type", "type", counts.frames_out
        )
        yield _counter("relay_errors", "Error frames sent, by reason", "reason", counts.errors)
        yield _counter("relay_joins", "Successful joins, by channel kind", "kind", counts.joins)
        rate_limited = counts.errors.get("rate limit", 0)
        cuts = CounterMetricFamily(
            "relay_cuts", "Sockets cut off or frames dropped by a limit", labels=["reason"]
        )
        cuts.add_metric(["rate_limited_frame"], rate_limited)
        for code, name in CUTS.items():
            cuts.add_metric([name], counts.closes.get(code, 0))
        yield cuts
        closes = CounterMetricFamily(
            "relay_closes",
            "Sockets the relay closed, by close code (1001 not counted)",
            labels=["code"],
        )
        for code, n in sorted(counts.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes

        members = getattr(state.hub, "_members", {})
        channels = GaugeMetricFamily(
            "relay_channels", "Channels with members here", labels=["kind"]
        )
        channels.add_metric(["chat"], len(members))
        channels.add_metric(["db"], len(state.dbhub.repos))
        yield channels
        subs = GaugeMetricFamily("relay_db_subscriptions", "db- subscriptions on this relay")
        subs.add_metric([], sum(len(s.everyone) for s in state.dbhub.repos.values()))
        yield subs
        catching_up = 0
        held = 0
        for s in state.dbhub.repos.values():
            catching_up += len(s.catching_up)
            held += sum(len(h.frames) for h in s.catching_up.values())
        backlog = GaugeMetricFamily(
            "relay_replay_backlog",
            "Resuming subscriptions and the live frames held for them",
            labels=["what"],
        )
        backlog.add_metric(["subscriptions"], catching_up)
        backlog.add_metric(["held_frames"], held)
        yield backlog

        yield CounterMetricFamily(
            "relay_db_events_ingested", "Events read from the log", value=counts.events_ingested
        )
        delivered = CounterMetricFamily(
            "relay_db_events_delivered",
            "Database event frames written to sockets",
            labels=["type"],
        )
        for t in DB_FRAMES:
            delivered.add_metric([t], counts.frames_out.get(t, 0))
        yield delivered
        latency = HistogramMetricFamily(
            "relay_db_commit_to_delivery_seconds",
            "From a commit (as the listener observed it) to its frames queued on sockets",
        )
        latency.add_metric([], counts.latency.cumulative(), counts.latency.total)
        yield latency

        listener = state.listener
        pos = GaugeMetricFamily("relay_listener_tick", "Ticks of the event log", labels=["which"])
        if listener is not None and listener.last_tick is not None:
            pos.add_metric(["listener"], listener.last_tick)
        if self.newest_tick is not None:
            pos.add_metric(["newest"], self.newest_tick)
        if self.oldest_tick is not None:
            pos.add_metric(["oldest"], self.oldest_tick)
        yield pos
        lag = GaugeMetricFamily("relay_listener_lag_ticks", "Newest tick minus the listener's")
        if listener is not None and listener.last_tick is not None and self.newest_tick:
            lag.add_metric([], max(0, self.newest_tick - listener.last_tick))
        yield lag
        up = GaugeMetricFamily("relay_up", "1 when the dependency is reachable", labels=["what"])
        up.add_metric(
            ["listener"], 1 if listener is not None and listener.connected.is_set() else 0
        )
        up.add_metric(["broker"], 1 if self.broker_up else 0)
        yield up

        if state.db is not None:
            pool = state.db.stats()
            g = GaugeMetricFamily("relay_pool_connections", "PostgreSQL pool", labels=["state"])
            g.add_metric(["size"], pool["size"])
            g.add_metric(["in_use"], pool["in_use"])
            yield g
            yield GaugeMetricFamily(
                "relay_pool_longest_checkout_seconds",
                "How long the longest-lent pool connection has been out",
                value=pool["longest_checkout_seconds"],
            )
            yield GaugeMetricFamily(
                "relay_pool_wedged",
                "1 when every connection is lent and one is stuck",
                value=1 if state.db.wedged else 0,
            )


def _counter(name: str, doc: str, label: str, values: dict[Any, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], n)
    return family


def registry_for(state: RelayState) -> tuple[CollectorRegistry, RelayCollector]:
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    collector = RelayCollector(state)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry, collector


__all__ = ["Counts", "RelayCollector", "error_reason", "registry_for"]
