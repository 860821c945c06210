"""The layer order (README, Layout; docs/layout.md): core ← models ← stages ← top. Every import in the package, at module
level or inside a function, points to its own layer or a lower one; among the stages, the runtime
imports neither ``export/`` (a deployed runtime ships without the exporter) nor anything above it. Within the
package no two modules import each other at module level, directly or through others (no import cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"export": "export", "calibration": "calibration", "runtime": "runtime"}  # package → folder
TOP = {"cli", "inference", "preflight", "launch"}  # wan_trt modules above the stages
LAYERS = {"core": 0, "models": 1, "stage": 2, "top": 3}


def layer_of(module: str) -> tuple[str, str] | None:
    """(layer, unit) of a ``wan_trt`` module name; None outside the package."""
    parts = module.split(".")
    if parts[0] != "wan_trt":
        return None
    second = parts[1] if len(parts) > 1 else ""
    if second in STAGES:
        return "stage", second
    if second == "models":
        return "models", "models"
    if second in TOP:
        return "top", second
    return "core", second or "wan_trt"


def package_modules() -> dict[Path, str]:
    """Every source file of the package with its module name."""
    found = {}
    for folder, package in [(ROOT / "wan_trt", "wan_trt"), *[(ROOT / f, f"wan_trt.{p}") for p, f in STAGES.items()]]:
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[path] = ".".join([package, *parts])
    return found


def imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from wan_trt import cli
    return names


def violations(modules: dict[Path, str], sources: dict[Path, str] | None = None) -> list[str]:
    """Each import of ``modules`` (path → module name; their text, or ``sources``) that breaks the order."""
    found = []
    for path, module in sorted(modules.items()):
        source = layer_of(module)
        text = sources[path] if sources is not None else path.read_text()
        for target_name in sorted(imported_modules(text)):
            target = layer_of(target_name)
            if target is None or target[1] == source[1]:
                continue
            upward = LAYERS[target[0]] > LAYERS[source[0]]
            runtime_rule = source == ("stage", "runtime") and target == ("stage", "export")
            if upward or runtime_rule:
                found.append(f"{path.relative_to(ROOT)} ({source[0]}) imports {target_name} ({target[0]})")
    return found


def test_every_import_points_down_the_layers():
    assert violations(package_modules()) == []


def test_the_checker_finds_an_upward_import():
    """The rule itself: the runtime importing the exporter (even inside a function), or the core a stage."""
    assert layer_of("wan_trt.runtime.loading") == ("stage", "runtime")
    assert layer_of("wan_trt.models.graphs") == ("models", "models")
    assert layer_of("wan_trt.inference") == ("top", "inference") and layer_of("numpy") is None
    modules = {ROOT / "runtime" / "x.py": "wan_trt.runtime.x", ROOT / "wan_trt" / "y.py": "wan_trt.y",
               ROOT / "export" / "z.py": "wan_trt.export.z"}
    sources = {ROOT / "runtime" / "x.py": "def f():\n    from wan_trt.export.graphs import T\n",
               ROOT / "wan_trt" / "y.py": "import wan_trt.runtime.manifest\nfrom wan_trt import cli\n",
               ROOT / "export" / "z.py": "from wan_trt.runtime import manifest\nfrom wan_trt.models import graphs\n"}
    assert violations(modules, sources) == [
        "runtime/x.py (stage) imports wan_trt.export.graphs (stage)",
        "runtime/x.py (stage) imports wan_trt.export.graphs.T (stage)",
        "wan_trt/y.py (core) imports wan_trt.cli (top)",
        "wan_trt/y.py (core) imports wan_trt.runtime.manifest (stage)"]


def module_level_imports(source: str, known: set[str]) -> set[str]:
    """The package modules ``source`` imports when it is imported: the import statements of its body (also under
    a top-level ``if``/``try``, but not ``if TYPE_CHECKING:``), not those inside functions or classes.
    ``from a import b`` names ``a.b`` where that is a module of ``known``, else ``a``."""
    found = set()

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                             for alias in node.names)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(source).body)
    return found & known


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or through others (strongly connected
    components of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return sorted(cycles)


def test_no_module_level_import_cycles():
    """No two package modules import each other when they are imported (directly or through others): an
    import cycle makes the import order decide whether a name exists yet. Imports inside functions run later
    and are free to point back."""
    modules = package_modules()
    known = set(modules.values())
    graph = {module: module_level_imports(path.read_text(), known) - {module} for path, module in modules.items()}
    assert import_cycles(graph) == []


def test_the_cycle_checker_finds_a_cycle():
    known = {"wan_trt.a", "wan_trt.b", "wan_trt.c", "wan_trt.runtime", "wan_trt.runtime.x"}
    assert module_level_imports("import wan_trt.a\nfrom wan_trt.runtime import x\n"
                                "if TYPE_CHECKING:\n    from wan_trt import b\n"
                                "def f():\n    import wan_trt.c\n", known) == {"wan_trt.a", "wan_trt.runtime.x"}
    graph = {"wan_trt.a": {"wan_trt.b"}, "wan_trt.b": {"wan_trt.c"}, "wan_trt.c": {"wan_trt.a"},
             "wan_trt.runtime.x": {"wan_trt.a"}}
    assert import_cycles(graph) == [["wan_trt.a", "wan_trt.b", "wan_trt.c"]]
    assert import_cycles({"wan_trt.a": {"wan_trt.b"}, "wan_trt.b": set()}) == []
