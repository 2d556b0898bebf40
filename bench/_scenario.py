"""Child process of ``python -m bench``: runs one scenario and writes its result as JSON.

    python bench/_scenario.py NAME PG_URL PGDATA CONFIG_JSON OUTPUT_JSON

The orchestrator runs each scenario in its own process (its own session), so that a
scenario that overruns its time can be killed with everything it started.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Postgres, quiet_logs


def main(argv: list[str]) -> int:
    name, url, pgdata, cfg_text, out = argv
    quiet_logs()
    module = importlib.import_module(f"sc_{name}")
    pg = Postgres(url=url, pgdata=Path(pgdata))
    result = asyncio.run(module.run(pg, json.loads(cfg_text)))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
