"""The import graph of ``src/layercap``: no cycles, and packages import only downward.

Every import counts, including those inside functions (a lazy import is still a dependency).
The layers (README "Architecture"):

    base         errors, io, scorefile
    bottom       models, data
    libraries    scores (torch), programs (numpy only), apply, evaluate
    report       renders records
    experiments  the one orchestration layer (every job and sweep as stages)
    commands     argument parsing; cli dispatches to them
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "layercap"

BASE = {"errors", "io", "scorefile", ""}  # "": layercap/__init__ (__version__, re-exported score types)
# package -> the packages it may import (besides itself and BASE)
ALLOWED: dict[str, set[str]] = {
    "errors": set(), "io": set(), "scorefile": set(),
    "models": set(),
    "data": {"models"},
    "scores": {"models", "data"},
    "programs": set(),
    "apply": {"models", "data", "programs", "scores"},
    "evaluate": {"models", "data"},
    "report": {"programs", "evaluate"},
    "experiments": {"models", "data", "scores", "programs", "apply", "evaluate", "report", "export"},
    "export": {"models", "data", "programs", "apply"},
    "commands": {"models", "data", "scores", "programs", "apply", "evaluate", "report", "experiments", "export"},
    "cli": {"commands"},
    "__main__": {"cli"},
    "": {"scorefile"},  # layercap/__init__.py re-exports the score file types
}
# third-party modules that a numpy-only package must not import
TORCH_LIKE = ("torch", "transformers", "peft", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` -> ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def third_party(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imports_of(path) if not m.startswith("layercap")}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles.

    A package's ``__init__`` importing its own submodules is not a cycle by itself; it becomes
    one only when a submodule imports the package back, which this counts.
    """
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _package_edges(g):
    for a, targets in g.items():
        for b in targets:
            pa, pb = package_of(a), package_of(b)
            if pa != pb:
                yield a, b, pa, pb


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its submodules is the package, not a dependency of them
    no_reexports = {a: {b for b in bs if not (a == b.rpartition(".")[0] and (SRC.parent / (a.replace(".", "/") + "/__init__.py")).is_file())}
                    for a, bs in g.items()}
    found = cycles(no_reexports)
    assert found == [], f"{len(found)} import cycle(s): {found}"


def test_layering():
    g = graph()
    violations = sorted(f"{a} -> {b}" for a, b, pa, pb in _package_edges(g)
                        if pb not in BASE and pb not in ALLOWED.get(pa, set()))
    unknown = sorted({package_of(m) for m in g} - set(ALLOWED))
    assert unknown == [], f"packages without a layer (add them to ALLOWED): {unknown}"
    assert violations == [], f"{len(violations)} layering violation(s):\n" + "\n".join(violations)


def test_programs_are_numpy_only():
    bad = sorted(f"{module_name(p)} imports {m}" for p in (SRC / "programs").rglob("*.py")
                 for m in third_party(p) if m in TORCH_LIKE)
    assert bad == [], bad


def test_cycle_finder_finds_a_cycle():
    # the checker itself can fail: a -> b -> c -> a is one component, d alone is none
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_thin_commands():
    long = {p.name: n for p in (SRC / "commands").glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 150}
    assert long == {}, f"commands over 150 lines (move the logic into the library): {long}"
