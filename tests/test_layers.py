"""The floors of dlx, read from the source: a lower floor never imports a higher one, and no two
modules import each other, not even inside a function (issue 21, item 4).

The import graph is built with ``ast`` from every ``.py`` file of the package, without importing
anything: every ``import`` and ``from ... import`` statement wherever it stands (module level,
inside functions and methods, under ``if TYPE_CHECKING:``), relative and absolute, and
``importlib.import_module``/``__import__`` with a literal name. ``from dlx import x`` and the
attributes read through ``import dlx`` (``dlx.record``, ``dlx.sweeps.store``) resolve to the module
that defines them, through the lazy table of dlx/__init__.py. The facade dlx/__init__.py itself
ties the floors together and is left out of the graph.

Floors, low to high (each may import its own floor and those below):

ground        errors, _args, _io, _quiet, families, _diffusers, fingerprint, timing
run protocol  config, protocol, run, share, session, _tap
data          trace and its file format (trace_file)
rendering     the render package: latent→RGB maps, decoders (a model registers its own), PNG
parts         guidance, interrupt, recorder, preview; parts (part_from_config builds any of them)
views         labels, plots, widgets, live, report
applications  sweep/*, metrics, demo, __main__; zoo/* and testing beside them

Parts sit above data and rendering because the recorder makes a ``Trace`` and ``Preview`` draws
with the rendering floor; data and rendering import nothing of the parts.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOORS = [
    ("ground", ["errors", "_args", "_io", "_quiet", "families", "_diffusers", "fingerprint", "timing", "stats"]),
    ("run protocol", ["config", "protocol", "run", "share", "session", "_tap"]),
    ("data", ["trace", "trace_file"]),
    ("rendering", ["render", "render.*"]),
    ("parts", ["guidance", "interrupt", "recorder", "preview", "guiders", "parts"]),
    ("views", ["labels", "tiles", "plots", "_notebook", "widgets", "live", "report"]),
    ("applications", ["sweeps", "sweeps.*", "metrics", "demo", "__main__", "zoo", "zoo.*", "testing", "testing.*"]),
]


# --- the graph --------------------------------------------------------------------------------------


def package_modules(root: Path, package: str = "dlx") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _facade_table(modules: dict[str, Path], package: str) -> dict[str, str | None]:
    """What ``from <package> import name`` (or ``<package>.name``) reaches: the module that defines
    the name (the lazy table ``_LAZY``, names the facade imports, submodules), ``None`` for names the
    facade defines itself (``__version__``)."""
    tree = ast.parse(modules[package].read_text())
    table: dict[str, str | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            for name, mod in ast.literal_eval(node.value).items():
                table[name] = f"{package}.{mod}"
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for a in node.names:
                table[a.asname or a.name] = f"{package}.{node.module}"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    table.setdefault(t.id, None)
    return table


class _Resolver:
    def __init__(self, modules: dict[str, Path], package: str):
        self.modules = modules
        self.package = package
        self.facade = _facade_table(modules, package)

    def name_in(self, base: str, name: str) -> str | None:
        """What ``from base import name`` reaches: a submodule, a module the facade points at, or
        ``base`` itself (``None``: the facade's own name)."""
        if f"{base}.{name}" in self.modules:
            return f"{base}.{name}"
        if base == self.package:
            if name not in self.facade:
                raise AssertionError(f"`from {base} import {name}`: {base} has no such name")
            return self.facade[name]
        return base

    def dotted(self, dotted: str) -> str | None:
        """The module an attribute chain such as ``dlx.sweeps.store.Store`` or ``dlx.record`` reads."""
        parts = dotted.split(".")
        for n in range(len(parts), 1, -1):
            if ".".join(parts[:n]) in self.modules:
                return ".".join(parts[:n])
        return self.name_in(parts[0], parts[1]) if len(parts) > 1 else None

    def relative(self, module: str, level: int, name: str | None) -> str:
        is_pkg = self.modules[module].name == "__init__.py"
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        if level > 1:
            base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))


def _attribute_chain(node: ast.Attribute) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


def import_edges(root: Path, package: str = "dlx") -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for every import of one module of ``package`` by another,
    the facade ``<package>/__init__.py`` left out on both ends."""
    modules = package_modules(root, package)
    res = _Resolver(modules, package)
    edges = []
    for mod, path in modules.items():
        if mod == package:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        found: list[tuple[str | None, int]] = []
        binds_package = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == package or a.name.startswith(package + "."):
                        if a.asname is None:
                            binds_package = True  # `import dlx.x` binds `dlx`: its attributes are read below
                        if a.name != package:
                            found.append((a.name, node.lineno))
                        if a.asname is not None and a.name == package:
                            raise AssertionError(f"{path}:{node.lineno}: `import {package} as {a.asname}` is not followed")
            elif isinstance(node, ast.ImportFrom):
                base = res.relative(mod, node.level, node.module) if node.level else (node.module or "")
                if base != package and not base.startswith(package + "."):
                    continue
                for a in node.names:
                    if a.name == "*":
                        found.append((base, node.lineno))
                    else:
                        found.append((res.name_in(base, a.name), node.lineno))
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                fn = _attribute_chain(node.func) if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                arg = node.args[0].value
                if fn in ("importlib.import_module", "import_module", "__import__") and isinstance(arg, str):
                    if arg.startswith("."):
                        level = len(arg) - len(arg.lstrip("."))
                        found.append((res.relative(mod, level, arg.lstrip(".") or None), node.lineno))
                    elif arg == package or arg.startswith(package + "."):
                        found.append((res.dotted(arg) if arg != package else None, node.lineno))
        if binds_package:
            inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain, once
                    chain = _attribute_chain(node)
                    if chain and chain.startswith(package + "."):
                        found.append((res.dotted(chain), node.lineno))
        for target, line in found:
            if target is not None and target != mod and target != package:
                if target not in modules:
                    raise AssertionError(f"{path}:{line}: imports {target}, which is no module of {package}")
                edges.append((mod, target, line))
    return sorted(set(edges))


def floor_of(module: str, package: str = "dlx", floors=FLOORS) -> int | None:
    short = module[len(package) + 1:]
    for i, (_, patterns) in enumerate(floors):
        if any(fnmatch.fnmatchcase(short, p) for p in patterns):
            return i
    return None


def upward(edges, package: str = "dlx", floors=FLOORS) -> list[str]:
    out = []
    for a, b, line in edges:
        fa, fb = floor_of(a, package, floors), floor_of(b, package, floors)
        if fa is not None and fb is not None and fb > fa:
            out.append(f"{a} ({floors[fa][0]}) imports {b} ({floors[fb][0]}) at {a.replace('.', '/')}.py:{line}")
    return out


def circles(edges) -> list[str]:
    """One named circle per strongly connected group of modules (Tarjan), with the line of each
    import on it: ``a → b (a.py:3) → a (b.py:9)``."""
    graph: dict[str, dict[str, int]] = {}
    for a, b, line in edges:
        graph.setdefault(a, {}).setdefault(b, line)
        graph.setdefault(b, {})
    index, low, stack, on, groups = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    out = []
    for group in groups:
        start = min(group)
        # the shortest way back to `start` inside the group (breadth first)
        prev, frontier, path = {start: None}, [start], None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in group:
                        continue
                    if w == start:
                        path = [v]
                        while prev[path[-1]] is not None:
                            path.append(prev[path[-1]])
                        path.reverse()
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if path:
                    break
            frontier = nxt
        hops = path + [start]
        text = hops[0] + "".join(f" → {b} ({a.replace('.', '/')}.py:{graph[a][b]})" for a, b in zip(hops, hops[1:]))
        if len(group) > len(path):  # more circles through these modules: every import among them
            inside = sorted((a, b) for a in group for b in graph[a] if b in group)
            text += "\n    every import inside this group: " + "; ".join(
                f"{a} → {b} ({a.replace('.', '/')}.py:{graph[a][b]})" for a, b in inside)
        out.append(text)
    return sorted(out)


# --- the package ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edges():
    return import_edges(ROOT)


def test_every_module_stands_on_a_floor():
    lost = [m for m in package_modules(ROOT) if m != "dlx" and floor_of(m) is None]
    assert not lost, f"modules on no floor (add them to FLOORS in tests/test_layers.py): {lost}"


def test_no_module_imports_a_higher_floor(edges):
    bad = upward(edges)
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_no_import_circles(edges):
    found = circles(edges)
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_graph_sees_what_the_brief_names(edges):
    # Sanity of the reading on the real source: imports inside functions are edges.
    assert ("dlx.trace", "dlx.timing") in {(a, b) for a, b, _ in edges}  # Trace.timing(), inside a method
    assert ("dlx.recorder", "dlx.trace") in {(a, b) for a, b, _ in edges}


# --- the checker itself, on a made-up package: it sees every kind of import and can fail ---------------


def _package(tmp_path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        f = tmp_path / "pkg" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


FAKE_FLOORS = [("low", ["low", "low2"]), ("mid", ["mid", "sub.*", "sub"]), ("high", ["high"])]


def test_checker_sees_every_kind_of_import(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from .low import Thing\n__version__ = '1'\n_LAZY = {'record': 'high', 'Mid': 'mid'}\n",
        "low.py": "class Thing: pass\n",
        "low2.py": ("from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from .mid import Mid\n"),
        "mid.py": "def f():\n    import pkg\n    return pkg.record\n",
        "high.py": ("def g():\n    from pkg import Thing, __version__\n"
                    "def h():\n    import importlib\n    importlib.import_module('pkg.sub.deep')\n"),
        "sub/__init__.py": "from .. import low\nfrom ..mid import x\n",
        "sub/deep.py": "from . import leaf\nimport pkg.low2\n",
        "sub/leaf.py": "",
    })
    got = {(a, b) for a, b, _ in import_edges(root, "pkg")}
    assert got == {
        ("pkg.low2", "pkg.mid"),  # under TYPE_CHECKING
        ("pkg.mid", "pkg.high"),  # `import pkg` inside a function; pkg.record resolved through _LAZY
        ("pkg.high", "pkg.low"),  # `from pkg import Thing`: the facade's import; __version__ is the facade's own
        ("pkg.high", "pkg.sub.deep"),  # importlib with a literal name
        ("pkg.sub", "pkg.low"), ("pkg.sub", "pkg.mid"),  # relative, two levels
        ("pkg.sub.deep", "pkg.sub.leaf"), ("pkg.sub.deep", "pkg.low2"),
    }


def test_checker_fails_on_an_upward_import_and_names_a_circle(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "_LAZY = {}\n",
        "low.py": "def f():\n    from .high import g\n",
        "low2.py": "",
        "mid.py": "from . import low2\n",
        "high.py": "from .mid import x\nfrom . import low\n",
    })
    e = import_edges(root, "pkg")
    assert upward(e, "pkg", FAKE_FLOORS) == ["pkg.low (low) imports pkg.high (high) at pkg/low.py:2"]
    assert circles(e) == ["pkg.high → pkg.low (pkg/high.py:2) → pkg.high (pkg/low.py:2)"]
    assert floor_of("pkg.sub.deep", "pkg", FAKE_FLOORS) == 1 and floor_of("pkg.other", "pkg", FAKE_FLOORS) is None


def test_checker_refuses_a_name_the_package_does_not_have(tmp_path):
    root = _package(tmp_path, {"__init__.py": "_LAZY = {}\n", "low.py": "from pkg import nothing\n"})
    with pytest.raises(AssertionError, match="no such name"):
        import_edges(root, "pkg")
