"""The sizes and time limits of ``python -m bench``'s profiles (full, --quick, --smoke).

Each profile maps a scenario to (its parameters, its time limit in seconds); the
parameters are what ``sc_<scenario>.run`` receives.
"""

from __future__ import annotations

from typing import Any

SCENARIOS = ["memory", "fanout", "db", "catchup", "storm", "write_cost"]

# Per profile: each scenario's parameters and its time limit in seconds.
PROFILES: dict[str, dict[str, tuple[dict[str, Any], float]]] = {
    "full": {
        "memory": ({"sizes": [1000, 10000], "warm": 20, "settle": 1.5}, 180),
        "fanout": (
            {
                "members": 1000,
                "seconds": 4,
                "rate": 20,
                "burst": 10,
                "rounds": 3,
                "deflate": [False, True],
                "fleets": 2,
            },
            300,
        ),
        "db": (
            {
                "subscribers": 1000,
                "accounts": 100,
                "rate": 1000,
                "seconds": 8,
                "flat_seconds": 4,
                "flat_rows": 10000,
                "hot_receivers": 10,
                "others": [100, 10000],
                "others_rate": 500,
                "others_seconds": 4,
                "writers": 4,
                "payload_bytes": 100,
                "fleets": 2,
                "warm": 0.5,
                "rounds": 2,
            },
            420,
        ),
        "catchup": ({"events": 20000}, 150),
        "storm": ({"clients": 1000}, 150),
        "write_cost": ({"seconds": 3, "rounds": 2}, 180),
    },
    "quick": {
        "memory": ({"sizes": [1000], "warm": 20, "settle": 1.0}, 90),
        "fanout": (
            {
                "members": 1000,
                "seconds": 2,
                "rate": 20,
                "burst": 10,
                "rounds": 1,
                "deflate": [False, True],
                "fleets": 2,
            },
            120,
        ),
        "db": (
            {
                "subscribers": 1000,
                "accounts": 100,
                "rate": 1000,
                "seconds": 4,
                "flat_seconds": 2,
                "flat_rows": 5000,
                "hot_receivers": 10,
                "others": [100, 2000],
                "others_rate": 500,
                "others_seconds": 2,
                "writers": 4,
                "payload_bytes": 100,
                "fleets": 2,
                "warm": 0.5,
                "rounds": 1,
            },
            150,
        ),
        "catchup": ({"events": 10000}, 90),
        "storm": ({"clients": 500}, 90),
        "write_cost": ({"seconds": 2, "rounds": 1}, 90),
    },
    "smoke": {
        "memory": ({"sizes": [50], "warm": 5, "settle": 0.2}, 60),
        "fanout": (
            {
                "members": 20,
                "seconds": 0.5,
                "rate": 20,
                "burst": 10,
                "rounds": 1,
                "deflate": [True],  # relay declines it, the bare server compresses: both paths
                "fleets": 1,
            },
            90,
        ),
        "db": (
            {
                "subscribers": 20,
                "accounts": 10,
                "rate": 200,
                "seconds": 1,
                "flat_seconds": 0.5,
                "flat_rows": 500,
                "hot_receivers": 3,
                "others": [5, 20],
                "others_rate": 200,
                "others_seconds": 0.5,
                "writers": 2,
                "payload_bytes": 100,
                "fleets": 1,
                "warm": 0.1,
                "rounds": 1,
            },
            90,
        ),
        "catchup": ({"events": 500}, 60),
        "storm": ({"clients": 30}, 60),
        "write_cost": ({"seconds": 0.3, "rounds": 1}, 60),
    },
}
