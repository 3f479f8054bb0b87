"""The folder tree is the architecture: the package root holds only the layers' folders, imports go down the layers
(never up, never in a circle, not even through an import inside a function), importing the adapters pulls in no
framework, and no module grows past ~500 lines. The graph is read from the source with `ast`, independently of
Python's import machinery. `python -m tests.test_architecture` prints the report (root, largest files, circles,
upward imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_ralora"

# bottom to top: a module may import its own layer and the layers below it (docs/architecture.md)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("adapters",),
    ("rank", "diagnostics"),
    ("callbacks",),
    ("modules", "tasks", "data"),
    ("evaluation",),
    ("run",),
    ("reporting",),
    ("cli",),
)
ROOT = {"__init__.py", *(name for layer in LAYERS for name in layer)}
MAX_LINES = 520  # ~500: a module longer than this does more than one job
FRAMEWORKS = ("hydra", "omegaconf", "lightning", "pytorch_lightning", "lightning_fabric")


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module below `root` (a package folder)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Import nodes under `if TYPE_CHECKING:` (never executed)."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return skipped


def import_graph(root: Path) -> dict[str, dict[str, bool]]:
    """{module: {project module it imports: whether only inside a function}}; every import counts, the ones inside
    functions too (an import moved into a function to dodge a circle is still the circle)."""
    files = module_files(root)
    graph: dict[str, dict[str, bool]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        inner = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, bool] = {}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node in skipped:
                continue
            for target in _targets(node, package, files):
                edges[target] = edges.get(target, True) and id(node) in inner
        edges.pop(name, None)
        graph[name] = edges
    return graph


def _targets(node: ast.Import | ast.ImportFrom, package: str, files: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads (the deepest existing module of each imported name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" for a in node.names]
    found = []
    for name in names:
        while name and name not in files:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def circles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), i.e. the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, layer in enumerate(LAYERS) if top in layer) if top else -1


def upward_imports(graph: dict[str, dict[str, bool]]) -> list[str]:
    """`a -> b` for every import of a higher layer by a lower one."""
    return [f"{a} -> {b}" for a, edges in graph.items() for b in edges if layer_of(b) > layer_of(a) >= 0]


def longest_files(root: Path, n: int = 5) -> list[tuple[int, str]]:
    sizes = [(len(p.read_text().splitlines()), str(p.relative_to(REPO))) for p in root.rglob("*.py")]
    return sorted(sizes, reverse=True)[:n]


@pytest.mark.parametrize("root", ["lightning_ralora", "benchmarks"])
def test_no_import_circles(root: str) -> None:
    assert circles(import_graph(REPO / root)) == []


def test_imports_go_down_the_layers() -> None:
    assert upward_imports(import_graph(PACKAGE)) == []


def test_package_root_holds_only_the_layers() -> None:
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries == ROOT, f"unexpected: {sorted(entries - ROOT)}, missing: {sorted(ROOT - entries)}"


def test_no_module_over_the_line_limit() -> None:
    too_long = [(n, f) for n, f in longest_files(PACKAGE, 1000) if n > MAX_LINES]
    assert too_long == []


def test_graph_reader_finds_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks themselves can fail: a planted circle (one side inside a function) and an upward import."""
    pkg = tmp_path / "lightning_ralora"
    for folder in ("adapters", "run"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "adapters" / "a.py").write_text("def f():\n    from lightning_ralora.run.b import g\n")
    (pkg / "run" / "b.py").write_text("from lightning_ralora.adapters import a\n\ndef g():\n    pass\n")
    graph = import_graph(pkg)
    assert graph["lightning_ralora.adapters.a"] == {"lightning_ralora.run.b": True}
    assert circles(graph) == [["lightning_ralora.adapters.a", "lightning_ralora.run.b"]]
    assert upward_imports(graph) == ["lightning_ralora.adapters.a -> lightning_ralora.run.b"]


def test_importing_the_adapters_pulls_in_no_framework() -> None:
    """`lightning_ralora.adapters` is plain PyTorch: a fresh interpreter that imports it has loaded no Hydra,
    OmegaConf or Lightning module."""
    code = "import sys, lightning_ralora.adapters; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert set(eval(loaded.stdout)) & set(FRAMEWORKS) == set()


def report() -> str:
    """Root entries, the longest files, circles, upward imports and imports inside functions, as text."""
    graph = import_graph(PACKAGE)
    inside = sorted(f"{a} -> {b}" for a, edges in graph.items() for b, inner in edges.items() if inner)
    lines = [
        f"package root ({len(list(PACKAGE.iterdir()))} entries): {sorted(p.name for p in PACKAGE.iterdir())}",
        "longest files: " + ", ".join(f"{f} ({n})" for n, f in longest_files(PACKAGE)),
        f"import circles: {circles(graph) + circles(import_graph(REPO / 'benchmarks'))}",
        f"upward imports: {upward_imports(graph)}",
        f"project imports only inside functions ({len(inside)}): " + "; ".join(inside),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
