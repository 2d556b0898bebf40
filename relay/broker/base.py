"""The broker contract: publish a channel message, receive the ones for channels we follow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class BrokerError(Exception):
    """The broker could not be reached: the publish or (un)subscribe did not happen."""


# deliver(app_id, channel, data): hand one message to the local hub.
DeliverFn = Callable[[str, str, str], None]


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, app_id: str, channel: str, data: str) -> None: ...

    async def subscribe(self, app_id: str, channel: str) -> None: ...

    async def unsubscribe(self, app_id: str, channel: str) -> None: ...

    async def ping(self) -> bool:
        """True when the broker answers now (readiness and metrics)."""
        ...
