"""Imports point down only (docs/architecture.md): read from the source with ``ast``, every import counted, lazy
ones inside functions included."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "sparsetrain"
CORE = ("layers", "sparsifiers", "methods", "recipe", "handle", "packing", "distributions", "graph")
PERIPHERY = ("models", "export", "accounting", "telemetry", "reporting", "runs", "data", "training", "analysis",
             "papers", "commands", "cli", "distributed", "comm", "integrations")
#: Utilities every layer may use, the core included: they import nothing of sparsetrain but each other.
UTILITIES = ("files", "formatting")


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the sparsetrain modules it imports (``from a.b import c`` counts ``a.b``)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("sparsetrain"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsetrain"):
                found.add(node.module)
        out[_module(path)] = found
    return out


def _top(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


IMPORTS = _imports()


def test_the_library_never_imports_the_cli():
    bad = {m: sorted(i for i in deps if _top(i) in ("commands", "cli"))
           for m, deps in IMPORTS.items() if _top(m) not in ("commands", "cli", "__main__")}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_only_the_core(core):
    deps = IMPORTS[f"sparsetrain.{core}"]
    assert not sorted(d for d in deps if _top(d) in PERIPHERY)


def test_only_training_parallel_knows_about_processes():
    users = sorted(m for m, deps in IMPORTS.items() if _top(m) == "training"
                   and any(_top(d) in ("distributed", "comm") for d in deps))
    assert users == ["sparsetrain.training.parallel"]


def test_no_import_cycles():
    # Edges between modules (a package's __init__ only re-exports, so it is left out as a target).
    packages = {m for m in IMPORTS if (PKG.parent / m.replace(".", "/") / "__init__.py").is_file()}
    graph = {m: {d for d in deps if d in IMPORTS and d not in packages and d != m} for m, deps in IMPORTS.items()}
    seen, on_path, cycles = set(), [], []

    def visit(m):
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        on_path.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles


@pytest.mark.parametrize("utility", UTILITIES)
def test_utilities_import_only_utilities(utility):
    deps = IMPORTS[f"sparsetrain.{utility}"]
    assert not sorted(d for d in deps if _top(d) not in UTILITIES)


def test_the_periphery_does_not_import_the_runners():
    lower = ("runs", "reporting", "telemetry", "accounting", "models", "data", "export", "distributed", "comm",
             "formatting", "files", "integrations")
    bad = {m: sorted(d for d in deps if _top(d) in ("training", "papers", "analysis"))
           for m, deps in IMPORTS.items() if _top(m) in lower}
    assert not {m: d for m, d in bad.items() if d}
