"""out=: results written into a preallocated array.

With ``out=``, workers write each result into the array instead of sending
it back: ``out[i]`` for item i, or ``out[lo:hi]`` for block i of a chunks=
map. The parent checks before any work starts that out can take the results
(`check_out`); a worker wraps fn in an `OutSink` that writes and returns None.
"""
import numpy as np

from .blocks import rule_rows, rule_total_rows
from .shared import open_shared


def _describe(a):
    return "shape %s, dtype %s" % (tuple(a.shape), a.dtype)


def check_out(out, n_items, rule):
    """TypeError/ValueError before any work starts when out cannot take the results."""
    if not isinstance(out, np.ndarray):
        raise TypeError("pmaprt: out= must be a numpy.ndarray (pmaprt.empty(..) makes a shared "
                        "one), got %s" % type(out).__name__)
    if out.ndim < 1:
        raise ValueError("pmaprt: out= must have at least one dimension (one row per item), "
                         "got a 0-d array")
    if out.dtype.hasobject:
        raise TypeError("pmaprt: out= cannot hold Python objects (dtype %s)" % out.dtype)
    if not out.flags.writeable:
        raise ValueError("pmaprt: out= is read-only")
    if n_items is None:
        return
    rows = rule_total_rows(rule) if rule is not None else n_items
    if out.shape[0] != rows:
        what = ("the input has %d rows (in %d blocks)" % (rows, n_items)) if rule is not None \
            else ("the input has %d items" % rows)
        raise ValueError("pmaprt: out= has %d rows (%s) but %s: out.shape[0] must be %d"
                         % (out.shape[0], _describe(out), what, rows))


class OutSink:
    """Worker side: wraps fn; writes fn's result for item `pos` into out and
    returns None. pos is set to the chunk's first index before each chunk."""

    __slots__ = ("fn", "out", "rule", "pos", "row_shape", "ok_dtypes")

    def __init__(self, fn, out, rule):
        self.fn = fn
        self.out = out
        self.rule = rule
        self.pos = 0
        self.row_shape = out.shape[1:]
        self.ok_dtypes = set()

    def __call__(self, *args):
        r = self.fn(*args)
        i = self.pos
        self.pos = i + 1
        self.put(i, r)

    def put(self, i, r):
        out = self.out
        a = r if isinstance(r, np.ndarray) else np.asarray(r)
        if self.rule is None:
            if i >= out.shape[0]:
                raise IndexError("pmaprt: out= has %d rows (%s) but the input has more items "
                                 "(item %d)" % (out.shape[0], _describe(out), i))
            want = self.row_shape
            lo, hi = i, i + 1
        else:
            lo, hi = rule_rows(self.rule, i)
            want = (hi - lo,) + self.row_shape
        if a.shape != want or (a.dtype not in self.ok_dtypes and not self._castable(a.dtype)):
            where = ("out[%d]" % i) if self.rule is None else ("out[%d:%d]" % (lo, hi))
            raise ValueError(
                "pmaprt: out= cannot take the result of item %d: the function returned %s; "
                "%s needs shape %s and a dtype that casts to %s (same_kind); out has %s"
                % (i, ("an array of " + _describe(a)) if isinstance(r, np.ndarray)
                   else "%s (%s)" % (type(r).__name__, _describe(a)),
                   where, tuple(want), out.dtype, _describe(out)))
        if self.rule is None:
            out[i] = a
        else:
            out[lo:hi] = a

    def _castable(self, dt):
        if np.can_cast(dt, self.out.dtype, "same_kind"):
            self.ok_dtypes.add(dt)
            return True
        return False


def open_sink(extra, fn, resolve):
    """Worker side: an OutSink around fn when the job has out= (`extra` is
    what JobArrays.desc_extra put in the job's descriptor), else None."""
    if not extra or extra.get("out") is None:
        return None
    return OutSink(fn, open_shared(extra["out"], resolve), extra.get("rule"))
