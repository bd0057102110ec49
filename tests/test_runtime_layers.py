"""The shared-memory floor and the runtime import only downwards, at module level."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "pmaprt"

# What each package may import from pmaprt (besides itself).
ALLOWED = {
    "_shm": {"_options", "_core"},
    "_runtime": {"_shm", "_array", "_arrays", "_access", "_options", "_errors", "_sched",
                 "_serialize", "_collective", "_memguard"},
}


def _imports(path):
    """(pmaprt module imported, inside a function?) for each import in `path`."""
    tree = ast.parse(path.read_text())
    in_fn = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_fn.update(id(n) for n in ast.walk(fn))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".")
            if node.level == 1:
                # a sibling in the same package: fine
                continue
            names = [parts[0]] if parts[0] else [a.name for a in node.names]
            for name in names:
                yield name, id(node) in in_fn
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield None, id(node) in in_fn


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_floor_below_it(package):
    for path in sorted((PKG / package).glob("*.py")):
        for name, inside in _imports(path):
            assert not inside, "%s imports inside a function" % path.name
            if name is not None:
                assert name in ALLOWED[package], "%s/%s imports pmaprt.%s" % (package, path.name, name)
