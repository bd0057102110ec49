"""What one Executor task is, on its way to a worker and back.

    parent: encode_task(fn bytes, args, kwargs) --> (task id, fn bytes, args bytes, buffers)
    worker: call(task) --> (task id, status, pickled result or packed exception)
    parent: deliver(future, status, payload) --> the future's result or exception,
            or the error that breaks the executor

- The arguments are pickled here, per task, in the parent (`encode_args`):
  a task that cannot be pickled fails its own future with a PicklingError,
  as ProcessPoolExecutor's does, and never stops its batch. Large buffers
  (ndarrays) stay out of that pickle, as PickleBuffers the pool's transport
  sends through shared memory.
- The worker unpickles the function and arguments inside ``call``: an error
  there (the task cannot be rebuilt in the worker) is status UNREADABLE,
  which breaks the executor, as a worker that dies unpickling a task breaks
  ProcessPoolExecutor. So does a result the parent cannot unpickle.
- ``call`` pickles the result itself, in the worker, so an unpicklable result
  fails that task's future only (PicklingError; a SystemExit or
  KeyboardInterrupt raised while pickling arrives as itself).
- Exceptions carry the worker's traceback as ``__cause__``, a
  ``concurrent.futures.process._RemoteTraceback`` as ProcessPoolExecutor
  sets it (pmaprt.RemoteTraceback, which maps use, is a subclass of it).
- ``call`` drops its references to the arguments and result before it
  returns (a worker keeps nothing of a finished task).
- ``process_chunk`` is the task that Executor.map(chunksize > 1) sends: a
  chunk of argument tuples run as one task.
"""
import concurrent.futures as _cf
import concurrent.futures.process as _cfp
import pickle
from concurrent.futures.process import BrokenProcessPool

from . import _arrays, _serialize
from ._arrays import OOB_MIN
from ._errors import pack_exception

OK, RAISED, UNREADABLE = 0, 1, 2

# --- worker side


def _dump_exc(exc):
    """The packed exception (see _errors.pack_exception), pickled."""
    return pickle.dumps(pack_exception(exc), _serialize.PROTOCOL)


# Functions decoded so far, by their bytes (a batch of tasks of one function
# carries its bytes once per task; decoding is done once).
_FUNCTIONS = _arrays.FunctionCache(256)


def call(task):
    """Runs in a worker: one submitted task. Never raises."""
    tid, fn_bytes, payload, buffers = task
    try:
        fn = _FUNCTIONS.load(fn_bytes)
        args, kwargs = pickle.loads(payload, buffers=buffers)
    except BaseException as e:
        return tid, UNREADABLE, _dump_exc(e)
    del task, payload, buffers
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:
        return tid, RAISED, _dump_exc(e)
    finally:
        del args, kwargs
    try:
        return tid, OK, _serialize.dumps_obj(result)
    except Exception as e:
        err = pickle.PicklingError("pmaprt.Executor: the result of %r (a %s) cannot be pickled: "
                                   "%s: %s" % (getattr(fn, "__qualname__", fn),
                                               type(result).__name__, type(e).__name__, e))
        err.__cause__ = e
        return tid, RAISED, _dump_exc(err)
    except BaseException as e:      # SystemExit, KeyboardInterrupt: as themselves
        return tid, RAISED, _dump_exc(e)


def process_chunk(fn_bytes, chunk):
    """Executor.map with chunksize > 1: one task runs a chunk of argument tuples."""
    fn = _FUNCTIONS.load(fn_bytes)
    return [fn(*args) for args in chunk]


# --- parent side


def _out_of_band(bufs):
    def cb(pb):
        try:
            raw = pb.raw()
        except BufferError:
            return True
        if raw.nbytes < OOB_MIN:
            return True
        bufs.append(pb)
        return False
    return cb


def encode_args(fn, args, kwargs):
    """(bytes, [PickleBuffer]) of a task's arguments; PicklingError naming the
    task when they cannot be pickled. Small arguments take one plain pickle;
    a pickle of OOB_MIN bytes or more is made again with its large buffers
    left out of band."""
    obj = (args, kwargs)
    first = None
    bufs = []
    try:
        data = pickle.dumps(obj, _serialize.PROTOCOL)
        if len(data) >= OOB_MIN:
            data = pickle.dumps(obj, _serialize.PROTOCOL, buffer_callback=_out_of_band(bufs))
        if not _serialize.names_main(data):
            return data, bufs
    except _serialize.PICKLE_ERRORS as e:
        first = e
    bufs = []       # objects of __main__, lambdas: by value (see _serialize)
    try:
        return _serialize.cloudpickle().dumps(obj, _serialize.PROTOCOL,
                                              buffer_callback=_out_of_band(bufs)), bufs
    except _serialize.PICKLE_ERRORS as e:
        first = first or e
    err = pickle.PicklingError("pmaprt.Executor: the task %r cannot be pickled for the "
                               "workers: %s: %s" % (fn, type(first).__name__, first))
    raise err from first


def encode_fn(fn, dumps_fn=_serialize.dumps_fn):
    """The function's bytes, or a PicklingError naming it. dumps_fn: a
    pool's captured store's, which ships large captured arrays once."""
    try:
        return dumps_fn(fn)
    except Exception as e:
        err = pickle.PicklingError("pmaprt.Executor: the function %r cannot be pickled for the "
                                   "workers: %s" % (fn, e.__cause__ or e))
        raise err from e


def encode_batch(batch, futs, dumps_fn=_serialize.dumps_fn, store=None, pins=None):
    """Each task's (tid, fn bytes, args bytes, buffers), its future put in
    futs; a task that cannot be pickled fails its own future
    (PicklingError) and is left out. dumps_fn encodes the functions; with
    a captured store, the pins it took are released if encoding is
    interrupted (Ctrl-C)."""
    codes = {}
    tasks = []
    try:
        for tid, f, fn, args, kwargs in batch:
            try:
                fn_bytes = codes.get(id(fn))
                if fn_bytes is None:
                    fn_bytes = codes[id(fn)] = encode_fn(fn, dumps_fn)
                payload, bufs = encode_args(fn, args, kwargs)
            except _serialize.PICKLE_ERRORS as e:
                set_future(f, exc=e)
                continue
            futs[tid] = f
            tasks.append((tid, fn_bytes, payload, bufs))
    except BaseException:
        if store is not None:
            store.unpin(pins)
        raise
    return tasks


def set_future(f, result=None, exc=None):
    try:
        if exc is not None:
            f.set_exception(exc)
        else:
            f.set_result(result)
    except _cf.InvalidStateError:
        pass  # already failed by a broken executor


def remote_exception(payload):
    """The exception a worker packed, with its traceback as ``__cause__``
    (the standard library's _RemoteTraceback, formatted as it formats it)."""
    data, tb = pickle.loads(payload)
    exc = pickle.loads(data)
    if tb:
        exc.__cause__ = _cfp._RemoteTraceback('\n"""\n%s"""' % tb)
    return exc


def deliver(f, status, payload):
    """Settle future f from a worker's answer. Returns None, or the
    BrokenProcessPool that must break the executor (the task or its result
    could not be unpickled), after failing f with it."""
    if f.done():
        return None
    try:
        if status == UNREADABLE:
            cause = remote_exception(payload)
            err = BrokenProcessPool("pmaprt.Executor: a worker could not unpickle a task "
                                    "(%s: %s)" % (type(cause).__name__, cause))
        elif status == OK:
            set_future(f, pickle.loads(payload))
            return None
        else:
            set_future(f, exc=remote_exception(payload))
            return None
    except BaseException as e:    # a result the parent cannot unpickle (SystemExit included)
        cause = e
        err = BrokenProcessPool("pmaprt.Executor: the result of a task could not be unpickled "
                                "(%s: %s)" % (type(e).__name__, e))
    err.__cause__ = cause
    set_future(f, exc=err)
    return err
