"""relay: a real-time backend serving WebSocket channels and live PostgreSQL changes."""

__version__ = "0.1.0"
