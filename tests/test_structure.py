"""The shape of the tree: imports point down (no cycles); files and functions stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("kiln_common", "kiln_infer", "kiln_train")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# Triton kernels are long straight-line programs; splitting them would only hide the arithmetic.
FUNCTION_LIMIT_EXEMPT = ("kiln_infer/kernels/",)

# Floors of kiln_infer, lowest first: a module may import its own floor or a lower one, never a higher one.
INFER_FLOORS = ("kernels", "lora", "model", "engine")
INFER_TOP = len(INFER_FLOORS)  # servicers, server, CLI and the other top-level modules


def _sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every kiln module a file imports (module level or inside functions), resolved to module names."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    known = {_module_name(p) for p in _sources(*PACKAGES)}
    return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in _sources(*PACKAGES)}


def _infer_floor(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "kiln_infer" or len(parts) < 2:
        return INFER_TOP
    return INFER_FLOORS.index(parts[1]) if parts[1] in INFER_FLOORS else INFER_TOP


def test_services_are_walled_apart() -> None:
    """kiln_common imports neither service; kiln_train never imports kiln_infer, nor kiln_infer kiln_train."""
    forbidden = {"kiln_common": ("kiln_infer", "kiln_train"), "kiln_train": ("kiln_infer",)}
    forbidden["kiln_infer"] = ("kiln_train",)
    bad = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if target.split(".")[0] in forbidden[module.split(".")[0]]
    ]
    assert bad == []


def test_kiln_infer_imports_never_go_up_a_floor() -> None:
    """kernels < lora < model < engine < servicers: nothing imports a floor above its own."""
    bad = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if module.startswith("kiln_infer")
        for target in targets
        if target.startswith("kiln_infer") and _infer_floor(target) > _infer_floor(module)
    ]
    assert bad == []


def test_the_import_graph_has_no_cycles() -> None:
    """A depth-first walk over module imports never meets a module still on its own path."""
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            # importing a package's __init__ from inside it is how Python loads it, not a cycle of ours
            if module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("path", _sources(*PACKAGES, "benchmarks"), ids=lambda p: str(p.relative_to(REPO)))
def test_files_and_functions_stay_small(path: Path) -> None:
    """No file over 400 lines; no function over 60 lines outside the Triton kernels."""
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name} has {source.count(chr(10))} lines"
    relative = path.relative_to(REPO).as_posix()
    if relative.startswith(FUNCTION_LIMIT_EXEMPT):
        return
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_rules_can_fail() -> None:
    """The floors and the graph are real (guards against checks that pass vacuously)."""
    assert _infer_floor("kiln_infer.engine.engine_core") > _infer_floor("kiln_infer.kernels.gemv")
    assert _infer_floor("kiln_infer.server") == INFER_TOP
    graph = _graph()
    assert any(t.startswith("kiln_common") for t in graph["kiln_infer.server"])
