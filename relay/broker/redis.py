"""Redis broker: channel messages shared by every relay process on one Redis.

Each process subscribes only to the channels its own sockets joined, so a
message costs Redis work per interested process, not per process.
Needs the ``redis`` extra (``pip install relay[redis]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import orjson

from relay.broker.base import BrokerError, DeliverFn

log = logging.getLogger("relay.broker")

PREFIX = "relay:chan:"


@contextlib.contextmanager
def _unavailable_as_broker_error() -> Iterator[None]:
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError) as err:
        raise BrokerError(f"redis: {type(err).__name__}") from err


PING_TIMEOUT = 2.0


class RedisBroker:
    def __init__(self, url: str, deliver: DeliverFn) -> None:
        self._url = url
        self._deliver = deliver
        self._redis: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(self._url)
        await self._redis.ping()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        # Subscribe to a private channel so the reader has something to wait on.
        await self._pubsub.subscribe(PREFIX + "_")
        self._reader = asyncio.create_task(self._read_loop(), name="redis-broker")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    @staticmethod
    def _key(app_id: str, channel: str) -> str:
        return PREFIX + orjson.dumps([app_id, channel]).decode()

    async def publish(self, app_id: str, channel: str, data: str) -> None:
        with _unavailable_as_broker_error():
            await self._redis.publish(self._key(app_id, channel), data)

    async def subscribe(self, app_id: str, channel: str) -> None:
        with _unavailable_as_broker_error():
            await self._pubsub.subscribe(self._key(app_id, channel))

    async def unsubscribe(self, app_id: str, channel: str) -> None:
        with _unavailable_as_broker_error():
            await self._pubsub.unsubscribe(self._key(app_id, channel))

    async def ping(self) -> bool:
        if self._redis is None:
            return False
        try:
            await asyncio.wait_for(self._redis.ping(), PING_TIMEOUT)
        except Exception:  # unreachable, timed out, or any redis error: not up
            return False
        return True

    async def _read_loop(self) -> None:
        while True:
            try:
                async for message in self._pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    key = message["channel"].decode()
                    app_id, channel = orjson.loads(key[len(PREFIX) :])
                    self._deliver(app_id, channel, message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("redis broker read failed; retrying")
                await asyncio.sleep(1)
