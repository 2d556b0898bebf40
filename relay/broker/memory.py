"""In-process broker: one relay process, messages delivered synchronously."""

from __future__ import annotations

from relay.broker.base import DeliverFn


class MemoryBroker:
    def __init__(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, app_id: str, channel: str, data: str) -> None:
        self._deliver(app_id, channel, data)

    async def subscribe(self, app_id: str, channel: str) -> None:
        return None

    async def unsubscribe(self, app_id: str, channel: str) -> None:
        return None

    async def ping(self) -> bool:
        return True
