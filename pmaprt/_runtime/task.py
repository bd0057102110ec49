"""One call on one worker: the lean path of Pool.apply, both sides.

A map builds a job state (a plan of its input, statistics, a window, chunk
sizing, a memory guard) that a single call does not need. A task is posted
to the same board as a map, in its own mode (MODE_TASK), so the crash,
Ctrl-C and termination handling of maps applies to it unchanged.

Protocol, step by step:

1. Caller (`apply`): pickle (function bytes, args, kwargs) with plain
   pickle. If that fails, or it is larger than the slot's inline area, or
   it carries a large buffer, the call takes the general path instead (a
   one-item map, which pickles with cloudpickle and sends arrays through
   shared memory).
2. Caller, lock held (`_post_task`): post the descriptor inline in a free
   slot (board.py) with S_N = S_LIMIT = 1, S_NEXT = 0, S_TASK_DONE = 0, and
   wake one worker with task=True (wake.py, steps 3-4: a hot spinner needs
   no wake call).
3. Worker (`run_task`): claim it with one compare-and-swap of S_NEXT 0 -> 1
   that also records k = 0 in W_CUR_K, inside the claim bracket (claims.py);
   a worker that loses the race goes on. Then W_CUR = (gen, 0, 1): a crash
   from here on is this task's.
4. Worker: run it. A result that fits the inline area is written over the
   descriptor, then S_TASK_LEN, then S_TASK_DONE = 1, then H_RESULTS_SEQ
   bumped and the parent woken if it sleeps. An error, or a larger result,
   goes as one record in the worker's ring (ring.py), then S_TASK_DONE = 2.
5. Caller: spin on S_TASK_DONE for TASK_SPIN_NS where the spin gate allows
   (_spin.py: a core left for it; in C, the GIL released),
   then wait as a map does until the task has news; take the result from the
   slot (S_TASK_DONE = 1) or from the record; retire the slot (board.py).
6. A worker that dies after step 4 stored S_TASK_DONE = 1 lost nothing: the
   result waits in the slot. One that dies inside step 3's bracket is
   reconciled (claims.py): a task nobody holds is posted again.
"""
import functools
import pickle
import time
import types

import numpy as np

from .. import _arrays, _serialize
from .._errors import PoolClosedError, RemoteTraceback, WorkerCrashedError, add_note, oom_hint
from .._options import MapOptions
from .._shm import (
    H_ACTIVE_MASK, H_PARENT_SLEEPING, H_RESULTS_SEQ, H_HOT_SPINNER, INLINE_DESC, MODE_TASK,
    REC_ERROR, REC_RESULT, S_CANCEL, S_DESC_LEN, S_DESC_SEG, S_FLAGS, S_GEN, S_LIMIT, S_MODE,
    S_N, S_NEXT, S_NWORK, S_STATE, S_TASK_DONE, S_TASK_LEN, SLOT_ACTIVE, SLOT_FREE, W_CUR_GEN,
    W_CUR_K, W_CUR_N,
)
from .claims import begin_move, end_move
from .job import Job
from .._spin import gate
from .wake import TASK_SPIN_NS

# Function -> its bytes, for functions pickled by reference (a module-level
# function's bytes name it; they never go stale). By-value functions
# (lambdas, closures, functions of __main__) and other callables (a bound
# method pickles its object) are pickled at each call: their bytes hold
# values that may have changed since.
_FN_BYTES = {}
_FN_BYTES_MAX = 256


def _refuse_captured(obj):
    # A large array inside the function (a closure over it): the general
    # path ships it once per pool through shared memory (_arrays.captured);
    # pickling it here would only be thrown away.
    if type(obj) is np.ndarray and obj.nbytes >= _arrays.CAPTURE_MIN:
        raise _LargeBuffer
    return None


def fn_bytes(fn):
    b = _FN_BYTES.get(fn)
    if b is None:
        b = _serialize.dumps_fn(fn, capture=_refuse_captured)
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
    if pb.raw().nbytes > INLINE_DESC // 4:
        raise _LargeBuffer
    return True


def encode(fn, args, kwargs):
    """Step 1: the task's descriptor, or None when it must take the general path."""
    try:
        fnb = fn_bytes(fn)
        desc = pickle.dumps((fnb, args, kwargs), _serialize.PROTOCOL,
                            buffer_callback=_small_buffers_inline)
    except Exception:
        return None     # the general path pickles with cloudpickle, or names what fails
    if len(desc) > INLINE_DESC:
        return None
    if _serialize.names_main(desc) and _main_count(desc) > _main_count(fnb):
        return None     # an object of __main__ in the arguments: the general path sends it by value
    return desc


def _main_count(data):
    return data.count(b"__main__") + data.count(b"__mp_main__")


class Task(Job):
    """The parent's side of one posted task: the Job the runtime sees (no
    backlog, no timeout, no SPMD: the protocol's defaults)."""

    __slots__ = ("gen", "off", "done", "value", "exc", "suspect", "r", "buf", "base")

    def __init__(self):
        self.gen = None
        self.off = None
        self.done = False
        self.value = None
        self.exc = None
        self.suspect = False
        self.r = self.buf = self.base = None

    def reconcile(self, curs, words, nxt):
        """True when the task was claimed (nxt == 1) by a worker that died
        before it recorded the claim: nobody holds it, it never ran, and the
        runtime posts it again."""
        if self.has_news() or nxt == 0:
            return False
        return not any(g == self.gen and (n > 0 or k == 0) for g, _, n, k in curs)

    def has_news(self):
        """Done: a record arrived (an error, a large result), or the result
        is in the slot (S_TASK_DONE; the caller takes it from there with
        take_slot, before the slot is retired)."""
        return self.done or self.in_slot()

    def in_slot(self):
        r = self.r
        if r is None:
            return False
        try:
            return r.load32(self.off + S_TASK_DONE) == 1   # 2: a record in the ring
        except ValueError:
            return False    # the pool was terminated: its wait says so

    def take_slot(self):
        """The result from the slot (the calling thread only: apply's)."""
        try:
            payload = bytes(self.buf[self.base: self.base + self.r.load64(self.off + S_TASK_LEN)])
        except ValueError:
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
            return      # step 6: its result is in the slot, the worker died after the task
        self._crashed(WorkerCrashedError("%s while running the task%s" % (what, oom_hint(rc)),
                                         pid, rc, (0, 1)))

    def on_load_crash(self, err):
        self._crashed(err)

    def on_lost_feed_chunk(self, k):
        self._crashed(WorkerCrashedError("a worker process terminated abruptly as it took the task"))

    def fail_here(self, exc):
        self._crashed(exc)


class TaskCaller:
    """The caller's side (a runtime mixin): steps 1, 2 and 5."""

    def apply(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on one worker; returns its result (or raises
        its exception, with the worker's traceback as ``__cause__``)."""
        if not callable(fn):
            raise TypeError("pmaprt: %r is not callable" % (fn,))
        self._check_open()
        desc = encode(fn, args, kwargs)
        if desc is None:
            if kwargs:
                fn = functools.partial(fn, **kwargs)
            # The general path: a one-item starmap.
            return list(self.run_map(fn, ((args,),), True,
                                     MapOptions.make(chunksize=1, inline=False)))[0]
        task = Task()
        with self._lock:
            self._check_open()
            gen, slot, off = self._post_task(task, desc)
        try:
            # Spin (in C, the GIL released) on the slot's done word where
            # the gate allows: a tiny call answers within it, with none of
            # wait()'s work.
            try:
                spin = gate.budget(TASK_SPIN_NS, self.awake_workers())
                if spin:
                    self._r.wait32(off + S_TASK_DONE, 0, 0, spin)
            except (AttributeError, ValueError, TypeError):
                pass    # terminated meanwhile: wait() says so
            while not task.has_news():
                self.wait(task, TASK_SPIN_NS)
            if not task.done:
                task.take_slot()
        except KeyboardInterrupt:
            # The worker may be deep in a long call: end it now, as a map does.
            self._jobs.pop(gen, None)
            self.terminate()
            raise
        finally:
            self._retire(gen, slot, off)
        if task.exc is not None:
            exc, task.exc = task.exc, None
            raise exc
        return task.value

    def _post_task(self, task, desc):
        """Step 2: put one task on the board (board.py, step 1). Lock held."""
        r, lay = self._r, self._layout
        s, off = self._free_slot()
        self._gen += 1
        gen = task.gen = self._gen
        task.off = off
        r.store32(off + S_STATE, SLOT_FREE)
        r.store64(off + S_GEN, gen)
        r.store32(off + S_MODE, MODE_TASK)
        r.store32(off + S_FLAGS, 0)
        r.store64(off + S_N, 1)
        r.store64(off + S_LIMIT, 1)
        r.store64(off + S_NEXT, 0)
        r.store32(off + S_CANCEL, 0)
        r.store32(off + S_NWORK, self.workers)
        r.store32(off + S_DESC_LEN, len(desc))
        r.store64(off + S_DESC_SEG, 0)
        r.store32(off + S_TASK_DONE, 0)
        base = off + lay.desc_off
        self._ctl.buf[base: base + len(desc)] = desc
        task.r, task.buf, task.base = r, self._ctl.buf, base
        r.store32(off + S_STATE, SLOT_ACTIVE)
        r.store64(H_ACTIVE_MASK, r.load64(H_ACTIVE_MASK) | (1 << s))
        self._jobs[gen] = task
        self.wake_workers(1, hot=True)
        return gen, s, off


class TaskRunner:
    """The worker's side (a worker mixin): steps 3 and 4."""

    def run_task(self, gen, off):
        """Claim the task, run it, put its result; False if another worker took it."""
        r, a = self.r, self.area
        r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_K, -1)
        r.store64(a + W_CUR_GEN, gen)
        begin_move(self)
        took = r.cas64_mark(off + S_NEXT, 0, 1, a + W_CUR_K, 0)
        end_move(self)
        if not took:
            return False
        self._set_cur(gen, 0, 1)
        r.store64(a + W_CUR_K, -1)
        t0 = time.perf_counter()
        try:
            n = r.load32(off + S_DESC_LEN)
            base = off + self.layout.desc_off
            fn_b, args, kwargs = pickle.loads(self.ctl.buf[base: base + n])
            fn = self.fns.load(fn_b)
        except BaseException as e:
            self._task_failed(gen, off, e, "while loading the task in the worker", t0)
            return True
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            self._task_failed(gen, off, e, None, t0)
            return True
        t1 = time.perf_counter()
        self.items_done += 1
        try:
            payload = _arrays.dumps_list([result], self.oob)
        except BaseException as e:
            err = TypeError("pmaprt: the result of the task (a %s) cannot be pickled to return "
                            "it from the worker: %s" % (type(result).__name__, e))
            self._task_failed(gen, off, err, None, t0, tb=False)
            return True
        hot = not self.recycling()
        if len(payload) <= INLINE_DESC and not _arrays.is_result_stub(payload):
            self.put_task_result(off, payload, hot)
        else:
            self.put(REC_RESULT, gen, 0, 1, payload, t0, t1, hot=hot)
            self._task_in_ring(off)
        self._set_cur(0, 0, 0)
        if self.max_items and self.items_done >= self.max_items:
            self.recycle()
        return True

    def _task_failed(self, gen, off, exc, where, t0, tb=True):
        self.put_error(gen, 0, 1, [], exc, where, t0, False, tb=tb, hot=True)
        self._task_in_ring(off)
        self._set_cur(0, 0, 0)

    def _task_in_ring(self, off):
        # The task's record is in the ring (an error, a large result): a
        # caller spinning on the slot's done word stops, and drains it.
        self.r.store32(off + S_TASK_DONE, 2)

    def put_task_result(self, off, payload, hot):
        """Step 4: a task's result, into its slot: the caller reads it there,
        with no record to parse."""
        r = self.r
        if hot and not self.hot_held:
            self.hot_held = r.cas64(H_HOT_SPINNER, 0, self.rank + 1)   # as put() does
        base = off + self.layout.desc_off
        self.ctl.buf[base: base + len(payload)] = payload
        r.store64(off + S_TASK_LEN, len(payload))
        r.store32(off + S_TASK_DONE, 1)
        r.add32(H_RESULTS_SEQ, 1)
        if r.load32(H_PARENT_SLEEPING):
            r.wake32(H_RESULTS_SEQ, 1 << 30)
