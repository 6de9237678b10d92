"""The packages' imports run one way, and no module imports itself back through others.

services (producers, workers, receiver) -> core (refunds) and provider (pagoefectivo);
the provider imports nothing of ours; the core imports no service; the tooling (refundctl)
may import everything and nothing imports it. Every import counts, those inside functions
too: an import deferred to call time is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("refunds", "pagoefectivo", "producers", "workers", "receiver", "refundctl")
SANDBOX = "pagoefectivo.sandbox"

# What each package may import of ours, besides itself.
ALLOWED = {
    "refunds": set(),
    "pagoefectivo": set(),
    # The simulated gateway is another party: it shares the wire protocol with our client and
    # keeps its own records; the tooling runs it, never a service.
    SANDBOX: {"pagoefectivo"},
    "producers": {"refunds", "pagoefectivo"},
    "workers": {"refunds", "pagoefectivo"},
    "receiver": {"refunds", "pagoefectivo"},
    "refundctl": set(PACKAGES) | {SANDBOX},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> set[tuple[str, str | None]]:
    """What ``path`` imports: (module, name imported from it or None), relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update((base, alias.name) for alias in node.names)
    return found


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """The project's modules and the project modules each depends on (``from pkg import mod``
    depends on ``pkg.mod``; ``from pkg.mod import thing`` on ``pkg.mod``)."""
    found = {module_name(path, root): imports_of(path, root)
             for package in packages for path in sorted((root / package).rglob("*.py"))}
    graph = {}
    for name, imported in found.items():
        targets = set()
        for module, item in imported:
            if item is not None and f"{module}.{item}" in found:
                targets.add(f"{module}.{item}")
            elif module in found:
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def owner(module: str) -> str:
    return SANDBOX if module == SANDBOX or module.startswith(SANDBOX + ".") else module.split(".")[0]


def wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} imports {target}" for name, targets in graph.items() for target in targets
                  if owner(target) != owner(name) and owner(target) not in ALLOWED[owner(name)]
                  and not (owner(name) == SANDBOX and owner(target) == "pagoefectivo"))


def cycles_in(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle met by a depth-first walk (a package importing its own submodules is not one)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if target.startswith(name + "."):
                continue
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def test_every_import_runs_the_allowed_way():
    wrong = wrong_imports(modules())
    assert not wrong, "imports running the wrong way:\n" + "\n".join(wrong)


def test_no_module_imports_itself_back():
    cycles = cycles_in(modules())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_graph_reads_relative_and_deferred_imports(tmp_path):
    """The checks above pass only because the graph is right: a made-up package shows it."""
    (tmp_path / "refunds").mkdir()
    (tmp_path / "refunds" / "__init__.py").write_text("")
    (tmp_path / "refunds" / "core.py").write_text(
        "from . import helper\n\ndef later():\n    from producers.api import thing\n")
    (tmp_path / "refunds" / "helper.py").write_text("from .core import later\n")
    (tmp_path / "producers").mkdir()
    (tmp_path / "producers" / "__init__.py").write_text("")
    (tmp_path / "producers" / "api.py").write_text("import json\n")
    graph = modules(tmp_path, ("refunds", "producers"))
    assert graph["refunds.core"] == {"refunds.helper", "producers.api"}
    assert graph["refunds.helper"] == {"refunds.core"}
    assert graph["producers.api"] == set()
    assert wrong_imports(graph) == ["refunds.core imports producers.api"]
    assert cycles_in(graph) == [["refunds.core", "refunds.helper", "refunds.core"]]
