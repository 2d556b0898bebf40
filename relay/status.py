"""``relay status``: a live summary of a running relay, read from ``GET /admin/status``.

The admin endpoint wants ``Authorization: Bearer <token>``: ``RELAY_ADMIN_TOKEN``
(or ``--token``), or, when neither is set, a short-lived root token of the
default app signed with the relay's own secret (so on the machine that runs a
development relay, ``relay status`` needs no setup).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

FETCH_TIMEOUT = 5.0


class StatusError(Exception):
    """The status could not be read; the message says what to do."""


def fetch(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url.rstrip("/") + "/admin/status", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as resp:
            body: dict[str, Any] = json.load(resp)
            return body
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise StatusError(
                f"{url} refused the admin token: pass --token or set RELAY_ADMIN_TOKEN to the"
                " relay's admin token (or use a root token of its default app)"
            ) from None
        raise StatusError(f"{url} answered HTTP {err.code} to /admin/status") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StatusError(
            f"no relay answers at {url} ({reason}): is relay serve running? Use --url"
        ) from None


def render(status: dict[str, Any]) -> Group:
    ready = status["status"] == "ready"
    head = Table.grid(padding=(0, 2))
    head.add_row(
        "[bold]relay[/bold]",
        "[green]ready[/green]"
        if ready
        else "[red]not ready[/red]: " + "; ".join(status["problems"]),
    )
    listener = status["listener"]
    lag = listener.get("lag_ticks")
    head.add_row(
        "listener",
        ("connected" if listener["connected"] else "[red]disconnected[/red]")
        + f", tick {listener.get('tick')} of {listener.get('newest_tick')}"
        + (f", lag {lag} ticks" if lag is not None else ""),
    )
    rates = status["rates"]
    head.add_row(
        "rates",
        f"{rates['events_per_second']:g} events/s, {rates['frames_in_per_second']:g} frames in/s,"
        f" {rates['frames_out_per_second']:g} frames out/s"
        f" (last {rates['window_seconds']:g} s)",
    )
    pool = status.get("pool") or {}
    if pool:
        head.add_row("pool", f"{pool['in_use']} of {pool['size']} connections in use")

    sockets = Table(title="sockets by app")
    sockets.add_column("app")
    sockets.add_column("sockets", justify="right")
    for app, n in status["sockets"].items():
        sockets.add_row(app, str(n))
    sockets.add_row("[bold]total[/bold]", f"[bold]{status['sockets_total']}[/bold]")

    channels = Table(title="top channels")
    channels.add_column("app")
    channels.add_column("channel")
    channels.add_column("members", justify="right")
    for c in status["top_channels"]:
        channels.add_row(c["app"], c["channel"], str(c["members"]))
    return Group(head, sockets, channels)


def run(url: str, token: str, watch: float | None, as_json: bool) -> int:
    console = Console()
    if as_json:
        print(json.dumps(fetch(url, token), indent=2))
        return 0
    if not watch:
        console.print(render(fetch(url, token)))
        return 0
    with Live(render(fetch(url, token)), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(render(fetch(url, token)))
        except KeyboardInterrupt:
            return 0
