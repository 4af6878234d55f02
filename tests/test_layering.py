"""The house's one rule: imports point one way (vocabulary <- engine <- hub <- app <- lab <- cli).

Every ``agme_hub`` module belongs to a layer (a top-level module is shared vocabulary; each sub-package
is a layer of its own); a module may import only from its own layer or the ones below it. An import of
an agme module inside a function must say why in a comment (there are no cycles to break).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "agme_hub"
LAYERS = ["vocabulary", "engine", "hub", "app", "lab", "cli"]
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    if module == "cli":
        return "cli"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "vocabulary"  # agme_hub itself re-exports; it is checked separately


def _imports(path: Path, module: str | None = None) -> list[tuple[str, ast.AST, bool]]:
    """(absolute agme module imported, node, inside a function) for every agme import in ``path``."""
    tree = ast.parse(path.read_text())
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "agme_hub":
                    if not child.module and child.level:  # `from . import x`: x are modules
                        found.extend((f"{target}.{alias.name}", child, in_function) for alias in child.names)
                    else:
                        found.append((target, child, in_function))
            elif isinstance(child, ast.Import):
                found.extend((alias.name, child, in_function) for alias in child.names
                             if alias.name.split(".")[0] == "agme_hub")
            visit(child, nested)

    visit(tree, False)
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + [ROOT / "cli.py"]


def _upward(path: Path, module: str) -> list[str]:
    own = LAYERS.index(_layer(module))
    found = []
    for target, node, _ in _imports(path, module):
        if target == "agme_hub" and module != "cli":
            found.append(f"{module}:{node.lineno} imports the package root")
        elif target != "agme_hub" and LAYERS.index(_layer(target)) > own:
            found.append(f"{module}:{node.lineno} imports {target} ({_layer(target)})")
    return found


def test_imports_point_one_way():
    upward = [line for path in _sources() if path != PACKAGE / "__init__.py"  # the public API re-exports all
              for line in _upward(path, _module_name(path))]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_lazy_agme_imports_say_why():
    silent = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for target, node, in_function in _imports(path):
            if in_function:
                here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                if "#" not in here:
                    silent.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} lazily")
    assert not silent, "lazy imports without a reason:\n" + "\n".join(silent)


def test_no_module_over_the_size_habit():
    large = [f"{p.relative_to(ROOT)}: {n} lines" for p in _sources()
             if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not large, "modules over ~600 lines:\n" + "\n".join(large)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The scanner itself: an engine module importing the app is reported; the vocabulary and its own layer are not."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..app import run_clean\nfrom ..data import ImageSet\nfrom .edit import GramStats\n")
    found = _upward(probe, "agme_hub.engine.probe")
    assert found == ["agme_hub.engine.probe:1 imports agme_hub.app (app)"]
