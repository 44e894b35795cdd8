"""Fail when production code grows rooms with more than one job.

No production file over 600 lines (``core/ops_exec.py`` excepted: its contract keeps the
primitives in one module) and no function over 60 lines. Run by ``make lint``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("core", "cogs", "bot.py", "scripts")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60
FILE_EXCEPTIONS = frozenset({"core/ops_exec.py"})


def production_files() -> Iterator[Path]:
    """Every Python file of the product (not tests, benchmarks or docs)."""
    for entry in PRODUCTION:
        path = ROOT / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def problems(path: Path) -> Iterator[str]:
    """What is too long in ``path``."""
    name = path.relative_to(ROOT).as_posix()
    text = path.read_text()
    lines = text.count("\n")
    if lines > MAX_FILE_LINES and name not in FILE_EXCEPTIONS:
        yield f"{name}: {lines} lines (at most {MAX_FILE_LINES})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield f"{name}:{node.lineno}: {node.name}() has {length} lines"


def main() -> int:
    """Print every problem; the exit status is 1 when there is any."""
    found = [problem for path in production_files() for problem in problems(path)]
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
