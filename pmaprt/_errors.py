"""Exceptions raised by pmaprt, rooted in the standard library's types, and
the one way an exception crosses from a worker to the caller.

A remote exception travels as a pair (exception bytes, traceback text):
`pack_exception` makes it in the worker, `rebuild_exception` turns it back
into the user's own exception type with the worker's traceback as its
``__cause__`` (CPython's ``_ExceptionWithTraceback`` / ``_rebuild_exc`` pair is
the model). Every path that returns an exception (a map's chunk, a task, the
Executor, the Dask backend, ``on_error="return"``) uses this pair.
"""
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
import os
import pickle
import signal
import traceback

from . import _serialize


class WorkerCrashedError(BrokenProcessPool):
    """A worker process died (killed by a signal, or exited) while it held work.

    Attributes: ``pid``, ``exitcode`` (negative: the signal number, as
    ``subprocess`` reports it), ``items`` (the ``(start, stop)`` index range
    the worker held, or None).
    """

    def __init__(self, message, pid=None, exitcode=None, items=None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.items = items


class RemoteTraceback(_RemoteTraceback):
    """The traceback of an exception raised in a worker, set as its ``__cause__``
    by maps (a subclass of the standard library's, so that code written for
    ProcessPoolExecutor's causes reads it; the Executor sets the standard
    library's own class)."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class PoolClosedError(RuntimeError):
    """The pool was closed or terminated; create a new one."""


class TooManyMapsError(RuntimeError):
    """Every job slot of the pool holds a live map (or task): consume or
    close some iterators, or create the Pool with a larger max_jobs."""


def oom_hint(exitcode):
    """A sentence to add when the exit looks like the out-of-memory killer."""
    if exitcode is not None and exitcode == -signal.SIGKILL:
        return " (SIGKILL is often the out-of-memory killer)"
    return ""


def describe_exit(exitcode):
    """'was killed by signal SIGKILL (9)' or 'exited with code 3'."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "signal %d" % -exitcode
        return "was killed by signal %s (%d)" % (name, -exitcode)
    return "exited with code %d" % exitcode


def pack_exception(exc, with_traceback=True, where=None):
    """(exception bytes, traceback text) for `exc`, raised in this process.

    An exception that cannot be pickled (or unpickled: a class that pickles
    but fails to rebuild) travels as a RuntimeError that names it, so the
    caller always gets an exception, never a hang. `where` prefixes the
    traceback with what the worker was doing."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) \
        if with_traceback else ""
    if where:
        tb = "(%s)\n%s" % (where, tb)
    try:
        data = _serialize.dumps_obj(exc)
        pickle.loads(data)
    except BaseException as pe:
        data = _bare_copy(exc)
        if data is None:
            data = pickle.dumps(RuntimeError("pmaprt: %s: %s (the exception could not be pickled: "
                                             "%s)" % (type(exc).__name__, exc, pe)),
                                _serialize.PROTOCOL)
    return data, tb


def _bare_copy(exc):
    """The exception's type with its arguments as text, pickled (its own
    state would not pickle: a RecursionError whose attributes nest deeply, an
    argument that is a lock), or None when that does not round-trip either."""
    try:
        args = [a if isinstance(a, (str, int, float, bool, type(None))) else repr(a)
                for a in exc.args]
        data = pickle.dumps(type(exc)(*args), _serialize.PROTOCOL)
        pickle.loads(data)
        return data
    except BaseException:
        return None


def rebuild_exception(data, tb):
    """The exception packed by `pack_exception`, with the worker's traceback
    (when there is one) as its ``__cause__``."""
    exc = pickle.loads(data)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


class ReturnedError:
    """An exception raised by fn on one item, travelling as that item's result
    (on_error="return"). The parent turns it back into the exception, with the
    worker's traceback as ``__cause__`` and the item's index in a note."""

    __slots__ = ("exc_bytes", "tb", "index", "pid")

    def __init__(self, exc_bytes, tb, index, pid):
        self.exc_bytes = exc_bytes
        self.tb = tb
        self.index = index
        self.pid = pid

    def __reduce__(self):
        return (ReturnedError, (self.exc_bytes, self.tb, self.index, self.pid))

    @classmethod
    def wrap(cls, exc, index, tb=True):
        data, tb_text = pack_exception(exc, tb)
        return cls(data, tb_text, index, os.getpid())

    def rebuild(self):
        exc = rebuild_exception(self.exc_bytes, self.tb)
        add_note(exc, "pmaprt: raised by the function on item %d of the map (worker pid %d)"
                 % (self.index, self.pid))
        return exc


def add_note(exc, note):
    if hasattr(exc, "add_note"):
        try:
            exc.add_note(note)
        except Exception:
            pass


def item_timeout_error(index, timeout, what):
    return TimeoutError("pmaprt: item %d of the map ran longer than timeout=%gs; %s was killed "
                        "and replaced" % (index, timeout, what))


class CollectiveError(RuntimeError):
    """A collective call failed: mismatched calls across ranks, a call outside an
    SPMD map, or a rank that left early."""


class CollectiveAbortedError(CollectiveError):
    """Another rank of the SPMD map failed (raised, died) while this rank waited."""
