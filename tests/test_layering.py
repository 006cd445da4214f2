"""Imports run one way (docs/design.md §8): a package imports only packages of a lower layer.

A new upward import, a cycle, or a new top-level package missing from the table fails here."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smft_dist"

# layer of each top-level package or module of smft_dist, lowest first; same layer: no imports between them
LAYERS = [
    ("errors", "io"),
    ("config",),
    ("memory",),
    ("data", "distributed", "optim", "selection"),
    ("model",),
    ("checkpoint",),
    ("eval", "patch"),
    ("train",),
    ("continual",),
    ("bench",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports() -> list[tuple[str, str, str]]:
    """-> (importing package, imported package, file:line) for every smft_dist import, also those
    inside functions."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        src = f.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                parts = m.split(".")
                if parts[0] == "smft_dist" and len(parts) > 1 and parts[1] != src:
                    found.append((src, parts[1], f"{f.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return found


def test_every_package_has_a_layer():
    names = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert names == set(LAYER), f"packages without a layer: {sorted(names - set(LAYER))}; stale: {sorted(set(LAYER) - names)}"


def test_imports_run_downward():
    imports = _imports()
    assert len(imports) > 50  # the scan sees the package's imports
    upward = [f"{where}: {src} imports {dst}" for src, dst, where in imports if LAYER[dst] >= LAYER[src]]
    assert not upward, "\n".join(upward)
