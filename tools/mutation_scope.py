"""Write a patch that marks only the given functions and classes of a module as changed.

mutmut 2 (``--use-patch-file``) then mutates only those lines: a way to run the
mutants of one part of a module (e.g. the permission filter of relay/dbhub.py).

    python tools/mutation_scope.py relay/dbhub.py RepoSubscribers audiences > scope.patch

A name is a top-level function or class, or Class.method.
"""

from __future__ import annotations

import ast
import difflib
import sys


def line_ranges(source: str, names: list[str]) -> set[int]:
    tree = ast.parse(source)
    wanted: set[int] = set()
    found: set[str] = set()
    for node in tree.body:
        for name, item in [(getattr(node, "name", ""), node)] + [
            (f"{getattr(node, 'name', '')}.{getattr(sub, 'name', '')}", sub)
            for sub in getattr(node, "body", [])
            if isinstance(node, ast.ClassDef)
        ]:
            if name in names and hasattr(item, "end_lineno"):
                start = min([item.lineno, *(d.lineno for d in getattr(item, "decorator_list", []))])
                wanted.update(range(start, item.end_lineno + 1))
                found.add(name)
    missing = set(names) - found
    if missing:
        raise SystemExit(f"not found in the module: {', '.join(sorted(missing))}")
    return wanted


def main() -> None:
    path, *names = sys.argv[1:]
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep = line_ranges("".join(lines), names)
    before = [line for n, line in enumerate(lines, 1) if n not in keep]
    sys.stdout.writelines(difflib.unified_diff(before, lines, path, path))


if __name__ == "__main__":
    main()
