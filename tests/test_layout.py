"""The package's layout stays legible: no import cycles, modules of a readable size, safe loading only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "megatron" / "prune"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    root = PKG.parent.parent
    return {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
            for f in sorted(PKG.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (function-level imports too), parents of a
    module and the package root left out."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + ".") and t != "megatron.prune":
                    edges[name].add(t)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_modules_are_of_a_readable_size():
    """A module over MAX_LINES lines says why in its docstring (the words "long because")."""
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES
            and "long because" not in (ast.get_docstring(ast.parse(path.read_text())) or "")}
    assert not long, f"split these by concern (see ../shared/STYLE.md): {long}"


def test_every_module_says_what_it_holds():
    missing = [name for name, path in modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, missing


def test_unsafe_loads_are_justified():
    """``weights_only=False`` unpickles arbitrary objects; each use carries a comment saying why on its line."""
    bad = [f"{path}:{i}" for path in modules().values() for i, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r"weights_only\s*=\s*False", line) and "#" not in line]
    assert not bad, bad


def test_no_megatron_init():
    """megatron/__init__.py would hide megatron-core's ``megatron.core`` (a namespace package)."""
    assert not (PKG.parent / "__init__.py").exists()


def test_no_unused_names_or_long_lines():
    """ruff's pyflakes checks (unused imports and names, undefined names) and the project's 120-column lines, over
    every Python file of the repository."""
    root = PKG.parent.parent
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E501", "--output-format", "concise",
                        "--no-cache", "."], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
