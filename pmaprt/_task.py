"""One call on one worker: the lean path of Pool.apply.

A map builds a job state (a plan of its input, statistics, a window, chunk
sizing, a memory guard) that a single call does not need: on a warm pool
that bookkeeping cost more than the call itself. A task is posted to the
same job board as a map, in its own mode (MODE_TASK): its descriptor, in
the slot's inline area, is the pickled (function bytes, args, kwargs); the
first worker to see it claims it with one compare-and-swap that also
records the claim in the worker's words (so a crash is reported as this
task's), runs it, and writes the result over the descriptor in the slot
(S_TASK_DONE, S_TASK_LEN; an error, or a result too large for the inline
area, goes as one record in its result ring). The parent waits for either
as for a map's records (spin briefly, then sleep on the results futex), so
the crash, Ctrl-C and pool-termination handling of maps applies to tasks
unchanged.

Calls whose arguments do not fit the inline area, or cannot be pickled
plainly, take the general path (a one-item starmap).
"""
import pickle
import types

from . import _arrays, _serialize, _shm
from ._errors import RemoteTraceback, WorkerCrashedError, add_note, oom_hint
from ._shm import REC_ERROR

# Function -> its bytes, for functions pickled by reference (a module-level
# function's bytes name it; they never go stale). By-value functions
# (lambdas, closures, functions of __main__) and other callables (a bound
# method pickles its object) are pickled at each call: their bytes hold
# values that may have changed since.
_FN_BYTES = {}
_FN_BYTES_MAX = 256


def fn_bytes(fn):
    b = _FN_BYTES.get(fn)
    if b is None:
        b = _serialize.dumps_fn(fn)
        if type(fn) is types.FunctionType and _serialize.by_reference(fn):
            if len(_FN_BYTES) >= _FN_BYTES_MAX:
                _FN_BYTES.clear()
            try:
                _FN_BYTES[fn] = b
            except TypeError:   # unhashable callable
                pass
    return b


class _LargeBuffer(Exception):
    pass


def _small_buffers_inline(pb):
    # pickle protocol 5: a buffer (an ndarray's data) goes in-band if this
    # returns true; a large one stops the pickling at once, before any copy:
    # the general path sends arrays through shared memory.
    if pb.raw().nbytes > _shm.INLINE_DESC // 4:
        raise _LargeBuffer
    return True


def encode(fn, args, kwargs):
    """The task's descriptor, or None when it must take the general path."""
    try:
        desc = pickle.dumps((fn_bytes(fn), args, kwargs), _serialize.PROTOCOL,
                            buffer_callback=_small_buffers_inline)
    except Exception:
        return None     # the general path pickles with cloudpickle, or names what fails
    if len(desc) > _shm.INLINE_DESC:
        return None
    return desc


class Task:
    """The parent's side of one posted task; the pool calls these methods
    (lock held) as it does a map's."""

    __slots__ = ("gen", "done", "value", "exc", "off", "suspect", "r", "buf", "base")
    backlog = ()
    timeout = None
    spmd = None

    def __init__(self):
        self.gen = None
        self.done = False
        self.value = None
        self.exc = None
        self.off = None
        self.suspect = False
        self.r = self.buf = self.base = None

    def reconcile(self, curs, words, nxt):
        """Pool._reconcile: True when the task was claimed (nxt == 1) by a
        worker that died before it recorded the claim: nobody holds it, it
        never ran, and the pool posts it again."""
        if self.has_news() or nxt == 0:
            return False
        return not any(g == self.gen and (n > 0 or k == 0) for g, _, n, k in curs)

    def has_news(self):
        """Done: a record arrived (an error, a large result), or the result
        is in the slot (see _shm.S_TASK_DONE; the caller takes it from there
        with take_slot, before the slot is retired)."""
        return self.done or self.in_slot()

    def in_slot(self):
        r = self.r
        if r is None:
            return False
        try:
            return r.load32(self.off + _shm.S_TASK_DONE) == 1   # 2: a record in the ring
        except ValueError:
            return False    # the pool was terminated: its wait says so

    def take_slot(self):
        """The result from the slot (the calling thread only: Pool.apply's)."""
        try:
            payload = bytes(self.buf[self.base: self.base + self.r.load64(self.off + _shm.S_TASK_LEN)])
        except ValueError:
            from ._errors import PoolClosedError
            raise PoolClosedError("pmaprt: the pool was terminated while a task was running")
        try:
            self.value = _arrays.loads_list(payload)[0]
        except Exception as e:
            self.exc = e
        self.done = True

    def on_record(self, w, kind, start, count, payload, t0, t1, cpu, stolen, enc=0.0):
        if self.done:
            return
        self.done = True
        try:
            if kind == REC_ERROR:
                ok_payload, exc_bytes, tb_text, pid = pickle.loads(payload)
                exc = pickle.loads(exc_bytes)
                if tb_text:
                    exc.__cause__ = RemoteTraceback(tb_text)
                add_note(exc, "pmaprt: raised by the function in worker pid %d" % pid)
                self.exc = exc
            else:
                self.value = _arrays.loads_list(payload)[0]
        except BaseException as e:
            self.exc = e

    def _crashed(self, err):
        if not self.done:
            self.done = True
            self.exc = err

    def on_lost(self, what, pid, rc, lo, cn, done, timed_out):
        if self.in_slot():
            return      # its result is in the slot: the worker died after the task
        self._crashed(WorkerCrashedError("%s while running the task%s" % (what, oom_hint(rc)),
                                         pid, rc, (0, 1)))

    def on_load_crash(self, err):
        self._crashed(err)

    def on_lost_feed_chunk(self, k):
        self._crashed(WorkerCrashedError("a worker process terminated abruptly as it took the task"))

    def fail_here(self, exc):
        self._crashed(exc)

    def flush_backlog(self):
        pass
