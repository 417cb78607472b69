"""Check the package's import layering: no cycles, no upward or sideways imports (``python tools/check_imports.py``).

Every ``import`` / ``from ... import`` of the package in every module is read with :mod:`ast`, including imports
inside functions and under ``TYPE_CHECKING``. The layers and what each may import:

==============  ==============================================================================
layer           may import
==============  ==============================================================================
_utils          nothing of the package (a leaf)
_constants      nothing of the package (a leaf)
_version        nothing of the package (a leaf)
_docs           nothing of the package (a leaf)
_provenance     nothing of the package (a leaf: fingerprints of the cells a result describes, and their checks)
_core           _core, _utils, _constants (array maths; no io, no AnnData storage)
io              io, _utils, _constants (readers and writers; no model code)
datasets        datasets, _utils, _constants
tl              tl, _core, io, datasets, _utils, _constants (joins _core and io)
get             get, io, _utils, _constants (reads what tl stored; genotypes through io, e.g. for LD)
pl              pl, get, io, _utils, _constants
_cli            _cli, tl, io, get, datasets, _utils, _constants
__init__        _version and the public subpackages (datasets, get, io, pl, tl)
__main__        _cli
==============  ==============================================================================

Every layer may also import the leaves (``_utils``, ``_constants``, ``_version``, ``_docs``). Within ``tl``, the
modules of the public tools (those ``tl/__init__.py`` imports from) are imported by no other ``tl`` module: what
tools share lives in modules of its own (``tl/_step2.py``, ``tl/_inputs.py``, ``tl/_backend.py``).

Exits 1 and lists every violation (``path:line: message``) when there is one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "scverse_nullfit"
LEAVES = {"_utils", "_constants", "_version", "_docs", "_provenance"}
ALLOWED: dict[str, set[str]] = {
    "_utils": set(),
    "_constants": set(),
    "_version": set(),
    "_docs": set(),
    "_provenance": set(),
    "_core": {"_core", "_utils", "_constants"},
    "io": {"io", "_utils", "_constants"},
    "datasets": {"datasets", "_utils", "_constants"},
    "tl": {"tl", "_core", "io", "datasets", "_utils", "_constants"},
    "get": {"get", "io", "_utils", "_constants"},
    "pl": {"pl", "get", "io", "_utils", "_constants"},
    "_cli": {"_cli", "tl", "io", "get", "datasets", "_utils", "_constants"},
    "__init__": {"_version", "datasets", "get", "io", "pl", "tl"},
    "__main__": {"_cli"},
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, module: str, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of a package module in ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            # ``from pkg import sub`` imports the submodule when there is one, else a name of ``pkg``
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in modules and "." in target:  # ``import pkg.mod.name`` style
                    target = target.rsplit(".", 1)[0]
                found.append((node.lineno, target))
    return sorted(set(found))


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: Path) -> list[str]:
    """Every violation of the layering under the package directory ``root``, as ``path:line: message``."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for module, path in modules.items():
        own = layer(module)
        if own not in ALLOWED:
            problems.append(f"{path}:1: layer {own!r} is not in tools/check_imports.py's ALLOWED table")
            continue
        for line, target in imports(path, module, modules):
            if target == module:
                continue
            graph[module].add(target)
            other = layer(target)
            if other != own and other not in ALLOWED[own] and (own in LEAVES or other not in LEAVES):
                problems.append(f"{path}:{line}: {module} imports {target} ({own} may not import {other})")
    tools = {t for _, t in imports(root / "tl" / "__init__.py", f"{PACKAGE}.tl", modules)} - {f"{PACKAGE}.tl"}
    for module, path in modules.items():
        if layer(module) == "tl" and module != f"{PACKAGE}.tl":
            for line, target in imports(path, module, modules):
                if target in tools and target != module:
                    problems.append(
                        f"{path}:{line}: {module} imports the tool module {target} (share via a module of its own)"
                    )
    for comp in find_cycles(graph):
        problems.append(f"{modules[comp[0]]}:1: import cycle among {', '.join(comp)}")
    return problems


def main() -> int:
    root = Path(__file__).resolve().parent.parent / "src" / PACKAGE
    problems = check(root)
    for line in problems:
        print(line)
    print(f"{len(problems)} import layering problem(s) in {root}" if problems else "import layering: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
