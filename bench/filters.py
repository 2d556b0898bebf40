"""What filtered subscribers cost the unfiltered ones: DbHub dispatch time per event.

In-process, no database and no network: the part of the relay that decides
who gets an event and queues the frames (relay.dbhub). A repository with
1,000 unfiltered subscribers over 100 accounts gets events for random
accounts; the same run is repeated with 0, 1,000 and 10,000 filtered
subscribers added in *other* accounts (they may not read these rows), and
with 1,000 filtered subscribers in the *same* accounts (they must each
evaluate their filter). Figures: microseconds of dispatch per event, and
the ratio to the run without filtered subscribers.

    python bench/filters.py [--events 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from relay.auth import Identity
from relay.dbhub import DbHub, Event
from relay.filters import Filter
from relay.hub import Socket
from relay.views import View

REPO = "tasks_760_"


def make_socket(user: str, account: str) -> Socket:
    s = Socket(None, "default", queue_limit=10**9)  # type: ignore[arg-type]
    s.identity = Identity(user, account)
    return s


def build(filtered: int, filtered_accounts: str) -> tuple[DbHub, list[Socket]]:
    hub = DbHub()
    sockets = []
    for i in range(1000):
        s = make_socket(f"u{i}", f"a{i % 100}")
        hub.subscribe(s, REPO)
        sockets.append(s)
    matcher = Filter.parse("project=eq.7").matcher("N")
    for i in range(filtered):
        account = f"a{i % 100}" if filtered_accounts == "same" else f"other{i % 100}"
        s = make_socket(f"f{i}", account)
        hub.subscribe(s, REPO, view=View(matcher, source="project=eq.7"))
        sockets.append(s)
    return hub, sockets


def events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    out = []
    for seq in range(n):
        account = f"a{rng.randrange(100)}"
        row = {"id": seq, "owner_id": "x", "account_id": account, "project": rng.randrange(10)}
        out.append(
            Event(
                tick=1,
                seq=seq,
                repo=REPO,
                op="c",
                row_id=str(seq),
                owner_id="x",
                account_id=account,
                data=json.dumps(row),
            )
        )
    return out


def run(filtered: int, where: str, evs: list[Event]) -> float:
    hub, sockets = build(filtered, where)
    start = time.perf_counter()
    for e in evs:
        hub.dispatch(e)
    elapsed = time.perf_counter() - start
    for s in sockets:
        s._queue.clear()
    return elapsed / len(evs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    evs = events(args.events, 1)
    configs = [(0, "other"), (1000, "other"), (10_000, "other"), (1000, "same")]
    results: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):  # interleaved rounds, medians
        for config in configs:
            results[config].append(run(*config, evs))
    base = statistics.median(results[(0, "other")])
    print(f"events={args.events} rounds={args.rounds} unfiltered subscribers=1000 (100 accounts)")
    print(f"{'filtered subscribers':<40} {'us/event':>9} {'ratio':>6}")
    for (count, where), times in results.items():
        label = f"{count} in {'the same' if where == 'same' else 'other'} accounts"
        median = statistics.median(times)
        print(f"{label:<40} {median:9.2f} {median / base:6.2f}x")


if __name__ == "__main__":
    main()
