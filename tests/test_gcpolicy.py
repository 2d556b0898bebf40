"""The garbage collector's schedule while a relay serves (``relay.gcpolicy``).

A running relay app walks the youngest generation every ``YOUNG_THRESHOLD``
allocations; the process's own schedule is back once its last relay app stops,
and automatic collection switched off stays off.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from relay import gcpolicy


@pytest.fixture
def default_schedule() -> Iterator[tuple[int, int, int]]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*saved)


def test_serving_raises_the_young_threshold_and_restores_it(
    default_schedule: tuple[int, int, int],
) -> None:
    with gcpolicy.serving():
        assert gc.get_threshold() == (gcpolicy.YOUNG_THRESHOLD, 10, 10)
    assert gc.get_threshold() == default_schedule


def test_overlapping_relays_restore_only_when_the_last_stops(
    default_schedule: tuple[int, int, int],
) -> None:
    first, second = gcpolicy.serving(), gcpolicy.serving()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # not in nesting order, as two test relays may stop
    assert gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD
    second.__exit__(None, None, None)
    assert gc.get_threshold() == default_schedule


def test_a_higher_threshold_and_collection_off_are_kept(
    default_schedule: tuple[int, int, int],
) -> None:
    gc.set_threshold(gcpolicy.YOUNG_THRESHOLD * 3, 5, 7)
    with gcpolicy.serving():
        assert gc.get_threshold() == (gcpolicy.YOUNG_THRESHOLD * 3, 5, 7)
    gc.set_threshold(0, 10, 10)
    with gcpolicy.serving():
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold() == (0, 10, 10)


async def test_a_running_relay_uses_the_schedule(
    default_schedule: tuple[int, int, int], relay: Callable[..., Awaitable[Any]]
) -> None:
    handle = await relay()
    assert gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD
    await handle.stop()
    assert gc.get_threshold() == default_schedule
