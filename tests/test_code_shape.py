"""Limits that keep the code readable in one sitting: short functions, few stage-level modules."""

from __future__ import annotations

import ast

from tests.conftest import REPOSITORY

MAX_FUNCTION_LINES = 60  # a function longer than a screen is usually two functions
# The five stages, predict and __init__.py, plus one spare: more usually means a helper that belongs
# in tasks/common, tasks/data or tasks/modeling.
MAX_TOP_LEVEL_TASK_MODULES = 8


def long_functions(max_lines: int) -> list[str]:
    """'file:line name (N lines)' for each function or method in tasks/ and flows/ longer than max_lines,
    counted from the `def` line (decorators excluded) to the last line of its body."""
    offenders = []
    for package in ("tasks", "flows"):
        for path in sorted((REPOSITORY / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > max_lines:
                        relative = path.relative_to(REPOSITORY).as_posix()
                        offenders.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    return offenders


def test_no_function_is_longer_than_the_limit():
    offenders = long_functions(MAX_FUNCTION_LINES)
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_tasks_has_few_top_level_modules():
    modules = sorted(path.name for path in (REPOSITORY / "tasks").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_TASK_MODULES, (
        f"tasks/ has {len(modules)} top-level modules, at most {MAX_TOP_LEVEL_TASK_MODULES} expected: {modules}"
    )
