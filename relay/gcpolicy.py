"""The cyclic garbage collector's schedule while a relay serves.

CPython walks its youngest generation of container objects every 700 net
allocations, the middle one every tenth time, and everything every hundredth
time once the old generation has grown by a quarter. A relay's heap is mostly
long-lived: each connection holds a hundred or so containers (its socket, limits
and queue, aiohttp's request, protocol, transport and tasks) for as long as it is
open, and a connection storm makes them by the hundred thousand. On that
schedule the collector walked the same new sockets again and again while they
aged, and the whole heap (startup objects included) a few times per storm:
about 130 us of CPU per client of a 1,000-client storm (``bench/storm.py``), a
fifth of the relay's work.

Walking the youngest generation every :data:`YOUNG_THRESHOLD` net allocations
instead walks each new object about once before it is promoted, and a full
collection comes a hundred times less often. The price: cyclic garbage waits
at most that many more allocations before it is freed (a few MB at most);
garbage without cycles is freed at once by reference counting, as before.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 10_000

_serving = 0
_previous: tuple[int, int, int] | None = None


@contextmanager
def serving() -> Iterator[None]:
    """The relay's schedule while at least one relay app of this process runs."""
    global _serving, _previous
    if _serving == 0:
        _previous = gc.get_threshold()
        young, middle, old = _previous
        if young:  # 0: automatic collection is off, and stays off
            gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
    _serving += 1
    try:
        yield
    finally:
        _serving -= 1
        if _serving == 0 and _previous is not None:
            gc.set_threshold(*_previous)
            _previous = None
