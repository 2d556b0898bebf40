"""The published StaticBackend JavaScript client (@staticbackend/js) against a real relay.

Node.js runs tests/js/sb_client.mjs with the package installed from the npm
registry into a temporary directory. Skipped, with the reason, where node or
npm is missing on a developer's machine; under CI (the ``CI`` environment
variable set) a missing one fails the test, and ``.ci/run`` installs both.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import random_name
from tests.helpers import require

SB_JS_VERSION = "1.7.0"
SCRIPT = Path(__file__).parent / "js" / "sb_client.mjs"


@pytest.fixture(scope="module")
def sb_js() -> Iterator[tuple[list[str], Path]]:
    node = require("node", "needed to run @staticbackend/js: apt-get install nodejs npm")
    npm = require("npm", "needed to install @staticbackend/js: apt-get install nodejs npm")
    workdir = Path(tempfile.mkdtemp(prefix="relay-sbjs-"))
    subprocess.run(
        [
            npm,
            "install",
            "--silent",
            "--no-audit",
            "--no-fund",
            f"@staticbackend/js@{SB_JS_VERSION}",
        ],
        cwd=workdir,
        check=True,
        timeout=300,
    )
    shutil.copy(SCRIPT, workdir / SCRIPT.name)
    # Node 20 has a global WebSocket only behind a flag; newer ones by default.
    flagged = subprocess.run(
        [node, "--experimental-websocket", "-e", "WebSocket"], capture_output=True
    )
    command = [node, "--experimental-websocket"] if flagged.returncode == 0 else [node]
    yield command, workdir
    shutil.rmtree(workdir, ignore_errors=True)


async def test_staticbackend_js_client_chats_through_relay(relay, client, sb_js) -> None:
    command, workdir = sb_js
    r = await relay()
    room = random_name()
    watcher = await client(r)
    await watcher.auth(r.token("watcher", "1"))
    await watcher.join(room)

    proc = await asyncio.create_subprocess_exec(
        *command,
        SCRIPT.name,
        f"ws://127.0.0.1:{r.port}",
        r.token("js-user", "1"),
        room,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    frames = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    types = [f["type"] for f in frames]
    assert types[0] == "onAuth" and frames[0]["data"]
    assert types[1:] == ["joined", "ok", "chan_out"]
    assert all(f["sid"] == frames[1]["sid"] for f in frames[1:])  # its own socket id
    # A Python client in the same channel heard the JavaScript client.
    heard = await watcher.expect("chan_out")
    assert (heard["channel"], heard["data"]) == (room, "hello from js")
