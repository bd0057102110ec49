"""The C extension's own surface: its stub names exactly what it defines, and
the budget of a timed piece carries the thresholds Python passes in."""
import ast
import os
import time

import pytest

from pmaprt import _core

STUB = os.path.join(os.path.dirname(_core.__file__), "_core.pyi")


def _public(names):
    return {n for n in names if not n.startswith("_")}


def _stub_names(body):
    """Public names a stub body defines: functions, classes, annotated names."""
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return _public(names)


def _stub():
    with open(STUB) as f:
        return ast.parse(f.read())


def test_stub_names_exactly_the_module_public_names():
    tree = _stub()
    assert _stub_names(tree.body) == _public(dir(_core))


@pytest.mark.parametrize("name", ["Region", "Mapping", "PieceBudget", "Results"])
def test_stub_names_exactly_each_type_public_names(name):
    classes = {c.name: c for c in _stub().body if isinstance(c, ast.ClassDef)}
    assert _stub_names(classes[name].body) == _public(dir(getattr(_core, name)))


def test_every_stub_function_has_a_one_line_docstring():
    for node in ast.walk(_stub()):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            assert doc and "\n" not in doc, node.name


def test_piece_budget_holds_its_thresholds_and_says_where_it_stopped():
    b = _core.PieceBudget(0.5, 2e-6, 16)
    assert (b.budget_s, b.dear_item_s, b.clock_stride, b.stop) == (0.5, 2e-6, 16, None)
    with pytest.raises(AttributeError):
        b.stop = 3
    with pytest.raises(AttributeError):
        b.budget_s = 1.0
    with pytest.raises(ValueError, match="clock_stride"):
        _core.PieceBudget(0.5, 2e-6, 0)
    with pytest.raises(TypeError):
        _core.PieceBudget(0.5)
    assert _core.PieceBudget(budget_s=1, dear_item_s=0, clock_stride=1).budget_s == 1.0


class _Tail(tuple):
    __slots__ = ()


def test_a_timed_piece_with_budget_to_spare_runs_to_its_end():
    b = _core.PieceBudget(60.0, 2e-6, 16)
    assert list(_core.Results(iter([_Tail((str, [1, 2, 3, 4], 1, 9, b))]), _Tail)) == \
        ["2", "3", "4"]
    assert b.stop == 4


def test_a_timed_piece_reads_the_clock_as_its_thresholds_say():
    # Item 1 outlasts the budget. The clock is read after item 0 (fast): with
    # every item counted dear, again after item 1, so the piece stops at 2;
    # with none counted dear, only after clock_stride more items.
    def f(x):
        if x == 1:
            time.sleep(0.1)
        return x

    for dear_item_s, stride, stop in ((0.0, 5, 2), (1e9, 5, 6), (1e9, 3, 4)):
        b = _core.PieceBudget(0.05, dear_item_s, stride)
        got = list(_core.Results(iter([_Tail((f, range(100), 0, 100, b))]), _Tail))
        assert (got, b.stop) == (list(range(stop)), stop), (dear_item_s, stride)


def test_an_inline_tail_takes_only_a_piece_budget():
    with pytest.raises(TypeError, match="PieceBudget"):
        list(_core.Results(iter([_Tail((str, [1], 0, 1, [0.0, None]))]), _Tail))
