"""minseg's layers import downwards only, with no cycle, read from the source (ast), function-level imports included:

    errors, files, data, image, metrics, coco  <-  ops  <-  backbones, necks, heads, data.transforms  <-  models
        <-  registry  <-  weights, convert, download  <-  api, visualize  <-  cli, __main__, the package root
        (minseg/__init__; with it everything no layer names: losses, training, evaluate, export)
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "minseg"

LAYERS = [
    ("minseg.errors", "minseg.files", "minseg.data", "minseg.image", "minseg.metrics", "minseg.coco"),
    ("minseg.ops",),
    ("minseg.backbones", "minseg.necks", "minseg.heads", "minseg.data.transforms"),  # transforms: box_iou
    ("minseg.models",),
    ("minseg.registry",),
    ("minseg.weights", "minseg.convert", "minseg.download"),
    ("minseg.api", "minseg.visualize"),
    ("minseg.cli", "minseg.__main__", "minseg"),
]
# third-party packages minseg may import at module level (the contract's runtime dependencies)
RUNTIME = {"torch", "numpy", "PIL", "safetensors", "minseg"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module` (the package root last: everything is under it)."""
    for prefix in sorted((p for group in LAYERS for p in group), key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return next(i for i, group in enumerate(LAYERS) if prefix in group)
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports(module: str) -> list[tuple[str, int, bool]]:
    path = MODULES[module]
    return imports_in(path.read_text(), module, path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in `source`, relative ones resolved;
    `from package import name` counts as importing package.name when that is a module."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((name if name in MODULES else base, node.lineno, id(node) in top_level))
    return found


def is_minseg(name: str) -> bool:
    return name == "minseg" or name.startswith("minseg.")


def minseg_edges() -> dict[str, set[str]]:
    return {m: {name for name, _, _ in imports(m) if is_minseg(name)} for m in MODULES}


def test_every_module_imports_only_its_layer_or_lower():
    upward = [f"{m} (layer {layer(m)}) imports {name} (layer {layer(name)}) at line {line}"
              for m in MODULES for name, line, _ in imports(m)
              if is_minseg(name) and layer(name) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    """Depth-first search over every import edge between minseg modules, function-level ones included."""
    edges = minseg_edges()
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if n == m or n not in MODULES:
                continue
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_module_level_imports_are_stdlib_or_runtime_dependencies():
    """No torchvision, smp, pycocotools, ... at import time (the contract's runtime dependencies only)."""
    foreign = [f"{m}:{line} imports {name}" for m in MODULES for name, line, top in imports(m)
               if top and name.split(".")[0] not in RUNTIME | set(sys.stdlib_module_names) | {"__future__"}]
    assert not foreign, "\n".join(foreign)


def test_the_checks_see_every_kind_of_import():
    """Function-level imports, relative imports and `from package import module` are all found."""
    assert layer("minseg.models.mask_rcnn") == 3 and layer("minseg.convert.common") == 5 and layer("minseg") == 7
    source = ("from minseg.ops import forms\nfrom . import fcn\nfrom ..heads.rpn import RPN\n"
              "def f():\n    import minseg.api\n")
    assert imports_in(source, "minseg.models.unet", False) == [
        ("minseg.ops.forms", 1, True), ("minseg.models.fcn", 2, True), ("minseg.heads.rpn", 3, True),
        ("minseg.api", 5, False)]


@pytest.mark.parametrize("module, forbidden", [
    ("minseg.ops", ("minseg.backbones", "minseg.necks", "minseg.heads", "minseg.models", "minseg.registry",
                    "minseg.api", "minseg.weights", "minseg.download", "minseg.cli", "minseg.convert.")),
    ("minseg.registry", ("minseg.api", "minseg.weights", "minseg.download", "minseg.cli", "minseg.convert.")),
])
def test_importing_a_layer_loads_nothing_above_it(module, forbidden):
    """In a fresh interpreter (the package root loads minseg.convert's dispatch, which loads no converter)."""
    code = f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.startswith('minseg'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(forbidden)], loaded
