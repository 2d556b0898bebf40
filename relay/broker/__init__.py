"""Brokers carry channel messages between relay processes; chosen by URL scheme."""

from __future__ import annotations

from relay.broker.base import Broker, BrokerError, DeliverFn


def create_broker(url: str, deliver: DeliverFn) -> Broker:
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        from relay.broker.memory import MemoryBroker

        return MemoryBroker(deliver)
    if scheme in ("redis", "rediss"):
        from relay.broker.redis import RedisBroker

        return RedisBroker(url, deliver)
    raise ValueError(f"unknown broker URL scheme {scheme!r}: use memory:// or redis://")


__all__ = ["Broker", "BrokerError", "DeliverFn", "create_broker"]
