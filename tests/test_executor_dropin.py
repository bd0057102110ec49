"""pmaprt.Executor as a drop-in for ProcessPoolExecutor: its constructor's
arguments, the exception types it raises, the references it releases, what
shutdown(cancel_futures=True) leaves running, and workers started on demand.

Each test names the standard library's behaviour it checks (the conformance
runner in tests/conformance/ runs CPython's own tests; these are the same
promises, small and fast). Every wait has a timeout.
"""
import gc
import multiprocessing
import os
import pickle
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import pytest

from pmaprt import Executor

pytestmark = pytest.mark.timeout(120)

T = 60


class Token:
    def method(self):
        return 1


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("error in pickle")


class ExitAtPickle:
    def __reduce__(self):
        raise SystemExit(3)


class ErrorAtUnpickle:
    def __reduce__(self):
        return _raise, (pickle.UnpicklingError,)


def _raise(err):
    raise err("error in unpickle")


def make(cls):
    return cls()


def make_token(_):
    return Token()


def getpid(_=None):
    return os.getpid()


def mul(a, b):
    return a * b


def test_constructor_takes_process_pool_executor_arguments():
    ctx = multiprocessing.get_context("spawn")
    with Executor(1, ctx, None, (), max_tasks_per_child=2) as ex:
        assert ex.mp_context is ctx
        pids = [ex.submit(getpid).result(timeout=T) for _ in range(4)]
    # Recycled after 2 tasks: a new worker, and no broken executor.
    assert pids[0] == pids[1] and pids[1] != pids[2] and pids[2] == pids[3]
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        Executor(1, max_tasks_per_child=0)
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        Executor(1, max_tasks_per_child="2")
    assert Executor(1).mp_context.get_start_method() == "spawn"


def test_pickling_errors_have_the_standard_types():
    with Executor(2) as ex:
        # An unpicklable task: PicklingError on its future; the executor goes on.
        with pytest.raises(pickle.PicklingError):
            ex.submit(id, ErrorAtPickle()).result(timeout=T)
        # An unpicklable result: PicklingError; a SystemExit while pickling it: SystemExit.
        with pytest.raises(pickle.PicklingError):
            ex.submit(make, ErrorAtPickle).result(timeout=T)
        with pytest.raises(SystemExit):
            ex.submit(make, ExitAtPickle).result(timeout=T)
        assert ex.submit(mul, 6, 7).result(timeout=T) == 42
        assert ex.broken is None


def test_a_task_the_worker_cannot_unpickle_breaks_the_executor():
    ex = Executor(2)
    try:
        with pytest.raises(BrokenProcessPool, match="unpickle"):
            ex.submit(id, ErrorAtUnpickle()).result(timeout=T)
        assert isinstance(ex.broken, BrokenProcessPool)
        with pytest.raises(BrokenProcessPool):
            ex.submit(mul, 1, 2)
    finally:
        ex.shutdown()


def test_a_result_the_parent_cannot_unpickle_breaks_the_executor():
    ex = Executor(2)
    try:
        with pytest.raises(BrokenProcessPool, match="unpickled"):
            ex.submit(make, ErrorAtUnpickle).result(timeout=T)
        assert isinstance(ex.broken, BrokenProcessPool)
    finally:
        ex.shutdown()


def _collected(ref, timeout=T):
    deadline = time.monotonic() + timeout
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return ref() is None


def test_no_reference_kept_to_a_finished_task_or_its_result():
    with Executor(2) as ex:
        tok = Token()
        ref = weakref.ref(tok)
        ex.submit(tok.method)            # the future is dropped at once
        del tok
        assert _collected(ref), "the executor keeps the task's function alive"
        for obj in ex.map(make_token, range(10), timeout=T):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None, "map keeps a result alive"


def test_shutdown_cancel_futures_lets_the_running_ones_finish():
    ex = Executor(2)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20
    assert 0 < len(others) <= 2 + 1          # a worker's worth and one more
    for f in others:
        assert f.done() and f.exception() is None


def test_workers_start_on_demand_and_idle_ones_are_reused():
    with Executor(4) as ex:
        assert ex.pids() == []                       # nothing before the first submit
        for _ in range(3):
            ex.submit(mul, 2, 3).result(timeout=T)
        assert len(ex.pids()) == 1                   # one worker, reused
        fs = [ex.submit(time.sleep, 0.3) for _ in range(12)]
        assert len(ex.pids()) == 4                   # a burst: up to max_workers
        for f in fs:
            f.result(timeout=T)
        assert ex.broken is None


class StateError(Exception):
    """An exception whose state does not pickle (it holds a lock)."""

    def __init__(self, msg, lock=None):
        super().__init__(msg)
        self.lock = lock


def raise_state_error():
    raise StateError("with a lock", threading.Lock())


def test_an_exception_whose_state_does_not_pickle_keeps_its_type():
    with Executor(1) as ex:
        with pytest.raises(StateError, match="with a lock"):
            ex.submit(raise_state_error).result(timeout=T)
