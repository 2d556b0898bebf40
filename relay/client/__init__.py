"""relay's Python asyncio client: channels and live views that survive reconnects.

    async with relay.client.connect("ws://127.0.0.1:8099/ws", get_token) as rc:
        view = await rc.live_view("db-tasks_760_", filter="status=eq.open")
        view.on_change(lambda kind, id, row: print(kind, id))
        await rc.join("lobby")
        await rc.publish("lobby", "hello")
        async for msg in rc.messages("lobby"):
            print(msg.data)

See the README section "Clients".
"""

from relay.client.core import Client, Disconnected, Message, Refused, Stats, TokenProvider, connect
from relay.client.view import ChangeCallback, LiveView, ViewRefused

__all__ = [
    "ChangeCallback",
    "Client",
    "Disconnected",
    "LiveView",
    "Message",
    "Refused",
    "Stats",
    "TokenProvider",
    "ViewRefused",
    "connect",
]
