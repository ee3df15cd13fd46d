"""Each shared word is defined once: the LoRA target modules, and how exceptions map onto gRPC statuses.

The packages' source is parsed (ast), not imported, so a second copy anywhere is found even in code no test
runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from kiln_common.lora_targets import TARGET_MODULES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kiln_common", "kiln_infer", "kiln_train")
LORA_HOME = "kiln_common/lora_targets.py"
STATUS_HOME = "kiln_common/grpc_status.py"
LORA_CHECK_EXCLUDED: tuple[str, ...] = ()


def sources() -> Iterator[tuple[str, ast.Module]]:
    """(path relative to the repository, parsed module) of every package source file."""
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), str(path))


def lora_name_literals(tree: ast.Module) -> list[int]:
    """Lines of list/tuple/set/dict literals holding two or more LoRA target module names."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items: list[ast.expr | None] = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys) + list(node.values)
        else:
            continue
        names = {i.value for i in items if isinstance(i, ast.Constant) and i.value in TARGET_MODULES}
        if len(names) >= 2:
            lines.append(node.lineno)
    return lines


def _status_codes(node: ast.AST) -> set[str]:
    """grpc.StatusCode.<X> / StatusCode.<X> members referred to anywhere under `node`."""
    codes = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            owner = n.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "StatusCode") or (
                isinstance(owner, ast.Name) and owner.id == "StatusCode"
            ):
                codes.add(n.attr)
    return codes


def _names_an_exception(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id.endswith(("Error", "Exception")))
        or (isinstance(n, ast.Attribute) and n.attr.endswith(("Error", "Exception")))
        for n in ast.walk(node)
    )


def _tests_a_type(test: ast.expr) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "issubclass")
        for n in ast.walk(test)
    )


def status_mappings(tree: ast.Module) -> list[int]:
    """Lines where exceptions are turned into gRPC status codes.

    An `except` handler that picks a status code; an `if` on isinstance/issubclass that picks one; a table
    (literal or constructor call) that pairs exception classes with status codes.
    """
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            hit = any(_status_codes(stmt) for stmt in node.body)
        elif isinstance(node, (ast.If, ast.IfExp)):
            hit = _tests_a_type(node.test) and bool(_status_codes(node))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict, ast.Call)):
            hit = bool(_status_codes(node)) and _names_an_exception(node)
        else:
            continue
        if hit:
            lines.append(getattr(node, "lineno", 0))
    return lines


def test_lora_target_names_are_written_once() -> None:
    copies = {
        path: lines
        for path, tree in sources()
        if path != LORA_HOME and not path.startswith(LORA_CHECK_EXCLUDED)
        for lines in [lora_name_literals(tree)]
        if lines
    }
    assert copies == {}, f"LoRA target names written outside {LORA_HOME} (import them from there): {copies}"


def test_exceptions_map_to_statuses_in_one_module() -> None:
    mappings = {path: lines for path, tree in sources() for lines in [status_mappings(tree)] if lines}
    assert list(mappings) == [STATUS_HOME], (
        f"exceptions are mapped onto gRPC statuses outside {STATUS_HOME} (use its StatusMapper): {mappings}"
    )


def test_the_checks_see_the_one_definitions() -> None:
    """The detectors are not vacuous: each finds the definition it protects."""
    trees = dict(sources())
    assert lora_name_literals(trees[LORA_HOME])
    assert status_mappings(trees[STATUS_HOME])
