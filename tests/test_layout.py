"""The package's layering rule, checked on its source.

- No import cycle among pmaprt's modules (a module-level import graph, read
  with ast, must be acyclic).
- No import of a pmaprt module inside a function: every dependency is visible
  at the top of the module that has it. Optional third-party dependencies
  (cupy, numba, dask, tqdm, matplotlib, ...) may be imported late.
- Size limits that keep each module readable in one sitting.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "pmaprt"
CSRC = PKG.parent / "csrc"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 350
MAX_C_LINES = 500
# pmaprt modules that exist to wrap an optional library and import it at
# their top: importing one late is importing that library late.
OPTIONAL_WRAPPERS = {"pmaprt.joblib": "joblib"}


def _modules():
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name, node, is_package):
    """The absolute module name an ImportFrom refers to."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    if node.module:
        base += node.module.split(".")
    return ".".join(base)


def _targets(name, path, tree_nodes):
    """The pmaprt modules that these import nodes load."""
    is_package = path.name == "__init__.py"
    # Importing from one's own package (``from . import x``) names the package,
    # which Python has already begun importing: an edge of Python's, not a
    # dependency of this module.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found = set()
    for node in tree_nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node, is_package)
            names = [mod] + ["%s.%s" % (mod, a.name) for a in node.names]
        else:
            continue
        for n in names:
            if n in MODULES and n not in ancestors:
                found.add(n)
    return found


def _top_level_imports(tree):
    """Imports that run when the module is imported (not inside a def)."""
    out = []

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            walk(child)
    walk(tree)
    return out


def _function_imports(tree):
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    out.append((node.name, child))
    return out


def _parse(path):
    return ast.parse(path.read_text(), str(path))


def import_graph():
    graph = {}
    for name, path in MODULES.items():
        deps = _targets(name, path, _top_level_imports(_parse(path)))
        # A submodule imports its package's __init__ first; that edge is
        # Python's, not the author's, and the package's own imports are
        # checked as its own node.
        graph[name] = {d for d in deps if d != name}
    return graph


def find_cycle(graph):
    """One cycle as a list of module names, or None."""
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_pmaprt_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers, bottom up: a module may import its own layer and those below.
LAYERS = [
    {"_options", "_errors", "_sched", "_stats", "_serialize", "_memguard", "_tuned", "_threads",
     "_spin"},
    {"_shm"},
    {"_arrays"},
    {"_access"},
    {"_collective"},
    {"_runtime"},
    {"_map"},
    {"_pool", "_api"},
    {"executor", "_executor_items", "_executor_state", "joblib", "dask", "_tune", "gpu", "bench"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _rank(module):
    parts = module.split(".")
    return len(LAYERS) if len(parts) == 1 else RANK[parts[1]]


def test_every_module_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(RANK))
    assert not unplaced, "modules with no layer in LAYERS: %s" % unplaced


def test_imports_only_look_down():
    up = ["%s -> %s" % (m, d) for m, deps in import_graph().items() for d in deps
          if _rank(d) > _rank(m)]
    assert not up, "imports of a higher layer:\n" + "\n".join(sorted(up))


def test_no_pmaprt_import_inside_a_function():
    late = []
    for name, path in MODULES.items():
        tree = _parse(path)
        for fn, node in _function_imports(tree):
            own = _targets(name, path, [node]) - set(OPTIONAL_WRAPPERS)
            if isinstance(node, ast.Import):
                own |= {a.name for a in node.names if a.name not in OPTIONAL_WRAPPERS
                        and (a.name == "pmaprt" or a.name.startswith("pmaprt."))}
            if own:
                late.append("%s:%d in %s()" % (path.relative_to(PKG.parent), node.lineno, fn))
    assert not late, "imports of pmaprt modules inside functions:\n" + "\n".join(late)


def _long_classes(path):
    out = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.ClassDef):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_CLASS_LINES:
                out.append("%s: class %s has %d lines" % (path.relative_to(PKG.parent), node.name, n))
    return out


def test_modules_and_classes_stay_small():
    too_long = []
    for path in MODULES.values():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            too_long.append("%s: %d lines" % (path.relative_to(PKG.parent), n))
        too_long += _long_classes(path)
    assert not too_long, "over the size limits (module %d, class %d lines):\n%s" % (
        MAX_MODULE_LINES, MAX_CLASS_LINES, "\n".join(too_long))


def test_c_files_stay_small():
    files = sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("*.h"))
    assert files, "no C sources found next to the package"
    too_long = ["%s: %d lines" % (p.name, len(p.read_text().splitlines())) for p in files
                if len(p.read_text().splitlines()) > MAX_C_LINES]
    assert not too_long, "C files over %d lines: %s" % (MAX_C_LINES, too_long)


@pytest.mark.parametrize("src, want", [
    ("from . import a\n", {"pmaprt.a"}),
    ("from .a import b\n", {"pmaprt.a", "pmaprt.a.b"}),
    ("def f():\n    from . import a\n", set()),
])
def test_import_reader(src, want, monkeypatch):
    # The graph reader on a made-up package of modules a and a.b.
    monkeypatch.setitem(globals(), "MODULES", {
        "pmaprt": PKG / "__init__.py", "pmaprt.a": PKG / "a" / "__init__.py",
        "pmaprt.a.b": PKG / "a" / "b.py", "pmaprt.x": PKG / "x.py"})
    got = _targets("pmaprt.x", PKG / "x.py", _top_level_imports(ast.parse(src)))
    assert got == want
