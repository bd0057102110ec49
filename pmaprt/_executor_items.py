"""What one Executor task is, on its way to a worker and back.

    parent: encode_tasks(batch) --> (task id, function bytes, args, kwargs)
    worker: call(task) --> (task id, ok, pickled result or packed exception)
    parent: deliver(future, ok, payload) --> the future's result or exception

- A batch carries each distinct function's bytes once per task; a worker
  decodes each distinct function once (a small cache keyed by its bytes).
- ``call`` pickles the result itself, in the worker, so an unpicklable
  result fails that task's future only, never the other tasks of its batch.
- ``process_chunk`` is the task that Executor.map(chunksize > 1) sends: a
  chunk of argument tuples run as one task.
"""
import concurrent.futures as _cf
import pickle

from . import _serialize
from ._errors import pack_exception, rebuild_exception

# --- worker side


def _dump_exc(exc):
    """The packed exception (see _errors.pack_exception), pickled."""
    return pickle.dumps(pack_exception(exc), _serialize.PROTOCOL)


# Functions decoded so far, by their bytes (a batch of tasks of
# one function carries its bytes once per task; decoding is done once).
_FN_CACHE = {}
_FN_CACHE_MAX = 256


def _load_fn(fn_bytes):
    fn = _FN_CACHE.get(fn_bytes)
    if fn is None:
        fn = _serialize.loads_fn(fn_bytes)
        if len(_FN_CACHE) >= _FN_CACHE_MAX:
            _FN_CACHE.clear()
        _FN_CACHE[fn_bytes] = fn
    return fn


def call(task):
    """Runs in a worker: one submitted task. Never raises."""
    tid, fn_bytes, args, kwargs = task
    fn = None
    try:
        fn = _load_fn(fn_bytes)
        result = fn(*args, **kwargs)
    except BaseException as e:
        return tid, False, _dump_exc(e)
    try:
        return tid, True, _serialize.dumps_obj(result)
    except BaseException as e:
        err = TypeError("pmaprt.Executor: the result of %r cannot be pickled: %s: %s"
                        % (getattr(fn, "__qualname__", fn), type(e).__name__, e))
        err.__cause__ = e
        return tid, False, _dump_exc(err)


def process_chunk(fn_bytes, chunk):
    """Executor.map with chunksize > 1: one task runs a chunk of argument tuples."""
    fn = _load_fn(fn_bytes)
    return [fn(*args) for args in chunk]


# --- parent side


def encode_tasks(batch):
    """(tid, function bytes, args, kwargs) for each task; each distinct
    function is encoded once (by reference, or by value when it must be)."""
    codes = {}
    tasks = []
    for tid, _, fn, args, kwargs in batch:
        key = id(fn)
        b = codes.get(key)
        if b is None:
            b = codes[key] = _serialize.dumps_fn(fn)
        tasks.append((tid, b, args, kwargs))
    return tasks


def find_unpicklable(t):
    """(index, exception) when task t cannot be encoded, else None."""
    try:
        fn_bytes = _serialize.dumps_fn(t[2])
    except Exception as e:
        return 0, e
    return _serialize.find_unpicklable([(t[0], fn_bytes, t[3], t[4])])


def set_future(f, result=None, exc=None):
    try:
        if exc is not None:
            f.set_exception(exc)
        else:
            f.set_result(result)
    except _cf.InvalidStateError:
        pass  # already failed by a broken executor


def deliver(f, ok, payload):
    if f.done():
        return
    try:
        value = pickle.loads(payload)
        if not ok:
            value = rebuild_exception(*value)
    except BaseException as e:
        set_future(f, exc=e)
        return
    if ok:
        set_future(f, value)
    else:
        set_future(f, exc=value)
