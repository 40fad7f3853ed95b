"""The package's import graph: no cycles (counting imports inside functions), and training is a leaf
that only the command line and the experiments build on."""

import ast
from pathlib import Path

import asbnn

ROOT = Path(asbnn.__file__).parent


def module_name(path: Path) -> str:
    parts = ["asbnn", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every asbnn module `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("asbnn")}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            if not target.startswith("asbnn"):
                continue
            for alias in node.names:  # `from . import metrics` imports a module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_no_import_cycles():
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        assert name not in stack, "import cycle: " + " -> ".join(stack[stack.index(name):] + [name])
        if name in done:
            return
        for dep in sorted(GRAPH[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


def test_only_the_cli_and_the_experiments_import_training():
    users = sorted(name for name, deps in GRAPH.items() if "asbnn.train" in deps)
    assert users == ["asbnn.cli", "asbnn.experiments.quickstart", "asbnn.experiments.reproduce"]


def test_the_library_never_imports_the_experiments():
    for name, deps in GRAPH.items():
        if not name.startswith(("asbnn.experiments", "asbnn.cli")):
            assert not [d for d in deps if d.startswith("asbnn.experiments")], name
