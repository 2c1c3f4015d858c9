"""The package's import structure: no cycle among picollm's modules, and no function-level import of a
picollm module that hides one.

Imports are read from the source (ast), function-level ones included, as the project's before-stop hook
reads them: a function-level import does not remove a cycle, it only postpones it to the first call.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "picollm"

# Function-level imports of picollm modules that are allowed, by file. Every other one is a failure:
# import at the top of the module, and if that makes a cycle, move the shared code down a layer.
LAZY_ALLOWED: dict[str, str] = {
    # the CLI's lazy verb loading: each verb imports what it runs inside `run`, so that `--help` and
    # the other verbs do not pay for it
    "picollm/commands/*": "lazy verb loading",
    # the transformers model code (imports transformers, an optional extra) is loaded only by --verify
    "picollm/export/verify.py": "optional transformers",
}

# Function-level imports of other packages that are allowed anywhere: dependencies that are optional
# (extras) or slow to import and needed by few paths. The standard library, yaml, numpy, torch, tokenizers
# and the like are imported at the top of the module; the commands (lazy verb loading) may import any
# non-standard-library package inside `run`.
LAZY_PACKAGES: dict[str, str] = {
    "transformers": "the hf extra",
    "fastapi": "the serve extra",
    "uvicorn": "the serve extra",
    "wandb": "the wandb extra",
    "datasets": "slow to import; only hf: sources",
    "huggingface_hub": "slow to import; only hub ids",
    "pyarrow": "only parquet sources",
    "matplotlib": "slow to import; only the report's plots",
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py below `root` (a package directory)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _enclosing_function(tree: ast.AST) -> dict[ast.AST, bool]:
    inside: dict[ast.AST, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        inside[node] = in_function
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(tree, False)
    return inside


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported picollm module, line, inside a function) for each import statement of `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = _enclosing_function(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the package itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            resolved = resolve(target)
            if resolved is not None and resolved != module:
                found.append((resolved, node.lineno, in_function[node]))
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The module graph (function-level imports included) and every function-level import of a module
    of the package, as 'file:line imports module'."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lazy = []
    for module, path in modules.items():
        for target, line, in_function in imports(module, path, modules):
            graph[module].add(target)
            if in_function:
                lazy.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    return graph, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _allowed(entry: str) -> bool:
    path = entry.split(":", 1)[0]
    return any(path == pattern or (pattern.endswith("/*") and path.startswith(pattern[:-1]))
               for pattern in LAZY_ALLOWED)


def test_no_import_cycles_among_picollm_modules():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 40 and "picollm.training.trainer" in graph["picollm"]
    found = cycles(graph)
    assert not found, "import cycles (a function-level import hides a cycle, it does not remove it):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_no_function_level_imports_of_picollm_modules_outside_the_allow_list():
    _, lazy = import_graph(PACKAGE)
    assert any(entry.startswith("picollm/commands/") for entry in lazy)  # the scan sees function bodies
    unexpected = [entry for entry in lazy if not _allowed(entry)]
    assert not unexpected, "function-level imports of picollm modules (import them at the top):\n" + \
        "\n".join(unexpected)


def lazy_package_imports(root: Path) -> list[tuple[str, str]]:
    """(file:line, top-level package) for each function-level import of a module outside the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = _enclosing_function(tree)
        for node in ast.walk(tree):
            if not in_function.get(node) or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top != root.name:
                    found.append((f"{path.relative_to(root.parent)}:{node.lineno}", top))
    return found


def test_function_level_imports_of_other_packages_are_only_of_optional_or_slow_ones():
    found = lazy_package_imports(PACKAGE)
    assert any(top == "transformers" for _, top in found)  # the scan sees function bodies
    unexpected = [f"{where} imports {top}" for where, top in found
                  if top not in LAZY_PACKAGES
                  and not (where.startswith("picollm/commands/") and top not in sys.stdlib_module_names)]
    assert not unexpected, "function-level imports (import them at the top of the module):\n" + "\n".join(unexpected)


def test_the_scan_finds_a_cycle_hidden_in_a_function_and_one_through_the_package_root(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.b import thing\n__version__ = '1'\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import c\n    return c\n")
    (pkg / "b.py").write_text("from pkg import __version__\nthing = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\nfrom . import b\n")
    graph, lazy = import_graph(pkg)
    assert sorted(cycles(graph)) == [["pkg", "pkg.b"], ["pkg.a", "pkg.sub.c"]]
    assert lazy == ["pkg/a.py:2 imports pkg.sub.c"]
    assert graph["pkg.d"] == {"pkg.a", "pkg.b"}  # `from pkg import a` is the submodule, not the root
