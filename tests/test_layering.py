"""Layering of ``ds_ext``: every module imports on its own, and the import graph inside ``ds_ext`` has no cycle.

**Imports on their own.** One interpreter imports the third-party packages ``ds_ext`` uses (torch, DeepSpeed,
megatron-core, ...; importing them takes seconds and cannot create a cycle inside ``ds_ext``), then forks one child
per ``ds_ext`` module; each child starts with no ``ds_ext`` module in ``sys.modules`` and imports just that module,
so an import that only works after some other ``ds_ext`` module was loaded first (the symptom of a cycle broken by
luck of import order) fails here, naming the module and the error. ``__main__`` modules are imported too (their
CLI runs only under ``if __name__ == "__main__"``).

**No cycle.** An AST walk over every ``ds_ext/**/*.py`` collects ALL import statements: module-level and
function-level (a lazy import inside a function is still an edge: it only moves the cycle to run time), inside
``if TYPE_CHECKING:`` too (a lower layer naming a higher one's types is still a layering inversion), ``import x``,
``from x import y`` and relative imports resolved against the importing module. Edge rules:

- ``import a.b.c`` and ``from a.b.c import name`` are an edge to the module ``a.b.c``; when it is a package, the
  edge goes to its ``__init__`` (the node ``a.b.c``).
- ``from a.b import c`` where ``c`` is a submodule of ``a.b`` is an edge to ``a.b.c`` only (Python sets the
  submodule attribute when the submodule finishes loading, so a package ``__init__`` that imports its submodules and
  a submodule that does ``from . import sibling`` do not form a cycle). When ``c`` is not a submodule, the edge goes
  to ``a.b``'s ``__init__``: a submodule that imports a name from its own package's ``__init__`` while that
  ``__init__`` imports the submodule IS a cycle (the name may not exist yet).
- Importing ``a.b.c`` also runs the parent packages' ``__init__``, but those implicit edges are NOT added: every
  module would then depend on ``ds_ext/__init__`` (which re-exports the top layer) and every module would be in one
  cycle. The first test covers what those implicit imports can break.

A second walk checks the other half of "layering": no module imports a private name (``_x``, not a submodule)
from a module of another ``ds_ext`` package, or reads ``alias._x`` from an imported module of another package.
Shared pieces move down and get public names; a feature does not reach into another feature's privates.

The cycle test prints each strongly connected component with one concrete cycle through it and the file:line of each
edge, so the fix can start from the message.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def module_files(root: Path = ROOT) -> dict:
    """Dotted module name -> file path relative to ``root``, for every ``.py`` file under ``<root>/ds_ext/`` (a
    package is named by its ``__init__``)."""
    out = {}
    for path in sorted((root / "ds_ext").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.relative_to(root)
    return out


def _is_package(name: str, files: dict) -> bool:
    return name in files and files[name].name == "__init__.py"


def _resolve_from(module: str, files: dict, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, files):
        base = base[:-1]  # a plain module's relative imports resolve against its package
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(files: dict, root: Path = ROOT) -> dict:
    """module -> {imported ds_ext module: "file:line" of the first import statement making that edge}."""
    edges = {name: {} for name in files}
    for module, path in files.items():
        tree = ast.parse((root / path).read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(module, files, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            for target in targets:
                # `import ds_ext.x.y` of a name that is not a file (an attribute) -> the longest existing prefix
                while target and target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != module:
                    edges[module].setdefault(target, f"{path}:{node.lineno}")
    return edges


def strongly_connected(edges: dict) -> list:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def a_cycle(comp: list, edges: dict) -> list:
    """A shortest cycle through the component's first module (breadth-first search inside the component)."""
    start, members = comp[0], set(comp)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if child in members and child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"component {comp} has no cycle through {start}")


def describe_cycles(edges: dict) -> str:
    lines = []
    for comp in strongly_connected(edges):
        cycle = a_cycle(comp, edges)
        lines.append(f"cycle among {len(comp)} modules {comp}:")
        lines += [f"    {a} -> {b}  ({edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "\n".join(lines)


def test_no_import_cycle_inside_ds_ext():
    files = module_files()
    edges = import_edges(files)
    assert sum(map(len, edges.values())) > len(files) / 2, "the walk found almost no edges: the walk is broken"
    report = describe_cycles(edges)
    assert not report, "import cycles inside ds_ext (see this module's docstring for the edge rules):\n" + report


def _package(module: str, files: dict) -> str:
    return module if _is_package(module, files) else module.rsplit(".", 1)[0]


def private_reaches(files: dict, root: Path = ROOT) -> list:
    """``file:line: importer uses target._name`` for each private name taken from a module of another package."""
    found = []
    for module, path in files.items():
        tree = ast.parse((root / path).read_text(), filename=str(path))
        aliases = {}  # local name -> ds_ext module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve_from(module, files, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in files:
                        aliases[alias.asname or alias.name] = sub
                    elif source in files and alias.name.startswith("_") and not alias.name.startswith("__") \
                            and _package(source, files) != _package(module, files):
                        found.append(f"{path}:{node.lineno}: {module} imports {source}.{alias.name}")
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in files})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = aliases[node.value.id]
                if _package(target, files) != _package(module, files) and f"{target}.{node.attr}" not in files:
                    found.append(f"{path}:{node.lineno}: {module} reads {target}.{node.attr}")
    return sorted(set(found))


def test_no_module_takes_private_names_from_another_package():
    found = private_reaches(module_files())
    assert not found, ("private names reached across ds_ext packages (move the shared piece down and give it a "
                       "public name):\n" + "\n".join(found))


def test_cycle_finder_finds_a_lazy_cycle_and_accepts_a_package_importing_its_submodules():
    """The checker itself can fail: a function-level import closing a cycle is found; ``__init__`` importing its
    submodules, which do ``from . import sibling``, is not a cycle."""
    edges = {"p": {"p.a": "x", "p.b": "x"}, "p.a": {"p.b": "x"}, "p.b": {"p.c": "x"}, "p.c": {"p.a": "lazy"}}
    assert strongly_connected(edges) == [["p.a", "p.b", "p.c"]]
    assert a_cycle(["p.a", "p.b", "p.c"], edges) == ["p.a", "p.b", "p.c", "p.a"]
    del edges["p.c"]["p.a"]
    assert not describe_cycles(edges)


def test_the_walk_sees_function_level_relative_and_from_package_imports(tmp_path):
    pkg = tmp_path / "ds_ext"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ds_ext.sub import low\n")
    (pkg / "sub" / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "low.py").write_text("def f():\n    from .. import top\n")
    (pkg / "sub" / "mid.py").write_text("from . import X\nimport ds_ext.sub.low\n")
    (pkg / "top.py").write_text("from .sub import mid\n")
    edges = import_edges(module_files(tmp_path), tmp_path)
    assert {k: sorted(v) for k, v in edges.items()} == {
        "ds_ext": ["ds_ext.sub.low"], "ds_ext.sub": [], "ds_ext.sub.low": ["ds_ext.top"],
        "ds_ext.sub.mid": ["ds_ext.sub", "ds_ext.sub.low"], "ds_ext.top": ["ds_ext.sub.mid"]}
    assert "ds_ext.sub.low -> ds_ext.top" in describe_cycles(edges)
    (pkg / "top.py").write_text("from .sub.low import _private, f\nfrom .sub import low as L\nL._g\nimport ds_ext._x\n")
    (pkg / "sub" / "mid.py").write_text("from .low import _same_package_is_fine\n")
    (pkg / "_x.py").write_text("")
    assert private_reaches(module_files(tmp_path), tmp_path) == [
        "ds_ext/top.py:1: ds_ext.top imports ds_ext.sub.low._private",
        "ds_ext/top.py:3: ds_ext.top reads ds_ext.sub.low._g"]


CHILD = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # a missing optional extra: the module that needs it reports the failure itself
    assert not any(m == "ds_ext" or m.startswith("ds_ext.") for m in sys.modules), "ds_ext preloaded"
    failures, running = {}, []

    def reap(name, pid, r):
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode()
        _, status = os.waitpid(pid, 0)
        if msg or status:
            failures[name] = msg or f"child exit status {status}"

    for name in modules:  # two children at a time: each is one core of import work
        if len(running) == 2:
            reap(*running.pop(0))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                msg = ""
            except BaseException:
                msg = traceback.format_exc(limit=-4)
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        running.append((name, pid, r))
    for child in running:
        reap(*child)
    print(json.dumps(failures))
""")


def third_party_roots(files: dict) -> list:
    """Top-level names of the non-``ds_ext`` packages ``ds_ext`` imports (preloaded once before the forks)."""
    roots = set()
    for path in files.values():
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            roots |= {n for n in names if n.split(".")[0] != "ds_ext"}
    return sorted(roots)


@pytest.mark.slow  # a forked interpreter per module, two at a time: ~18 s on 2 cores
def test_every_module_imports_on_its_own():
    files = module_files()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sorted(files)),
                           json.dumps(third_party_roots(files))],
                          capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail to import in a fresh interpreter:\n" + "\n".join(
        f"--- {name}\n{msg}" for name, msg in failures.items())


def test_every_import_goes_down_the_layers():
    """``ds_ext.layers.LAYERS`` is the layer order; every import edge (module-level and lazy) goes to the same or a
    lower layer, and no feature package imports another."""
    from ds_ext.layers import upward_edges
    bad = upward_edges(import_edges(module_files()))
    assert bad == [], "imports against ds_ext.layers.LAYERS:\n" + "\n".join(bad)


def test_the_layer_check_can_fail():
    from ds_ext.layers import layer_of, upward_edges
    assert layer_of("ds_ext.noloco.config") < layer_of("ds_ext.contract") < layer_of("ds_ext.noloco.feature")
    assert layer_of("ds_ext") > layer_of("ds_ext.engine")
    edges = {"ds_ext.models.llama": {"ds_ext.streambp.layer": "llama.py:1"},
             "ds_ext.noloco.feature": {"ds_ext.recovery.journal": "f.py:2", "ds_ext.recovery.config": "f.py:3"}}
    assert upward_edges(edges) == [
        "ds_ext.models.llama -> ds_ext.streambp.layer (llama.py:1): layer models imports layer features",
        "ds_ext.noloco.feature -> ds_ext.recovery.journal (f.py:2): a feature imports another feature"]
