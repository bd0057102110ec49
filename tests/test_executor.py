"""pmaprt.Executor against the documented semantics of concurrent.futures.

Each test states the behaviour the standard library documents for
Executor/ProcessPoolExecutor and checks pmaprt.Executor does the same:
result ordering of map, exceptions with the worker's traceback, map's timeout
counted from the call, cancel_futures, shutdown with work pending, and a
worker crash breaking the executor. Every wait has a timeout.
"""
import concurrent.futures as cf
import os
import pickle
import signal
import threading
import time

import psutil
import pytest

from pmaprt import Executor, Pool, RemoteTraceback
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

pytestmark = pytest.mark.timeout(60)

T = 30  # seconds: the bound on every wait in this file


class MyError(Exception):
    pass


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def sleep_then(x, s):
    time.sleep(s)
    return x


def fail_on(x, bad):
    if x == bad:
        raise MyError("item %d failed" % x)
    return x


def pid(_=None):
    return os.getpid()


def suicide(_=None):
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def return_lock():
    return threading.Lock()


def wait_for_file(path, timeout=T):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def ex():
    e = Executor(max_workers=2)
    yield e
    e.shutdown(wait=True)


def test_is_a_concurrent_futures_executor(ex):
    assert isinstance(ex, cf.Executor)
    f = ex.submit(add, 1, b=2, c=3)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=T) == 6
    assert ex.submit(pid).result(timeout=T) != os.getpid()


def test_map_results_in_input_order(ex):
    # Unequal durations: later items finish first, map still yields in order.
    xs = list(range(12))
    delays = [0.05 if i % 3 == 0 else 0.0 for i in xs]
    assert list(ex.map(sleep_then, xs, delays, timeout=T)) == xs
    assert list(ex.map(square, range(500), timeout=T)) == [x * x for x in range(500)]
    assert list(ex.map(add, range(7), range(100), timeout=T)) == [2 * x for x in range(7)]


def test_map_chunksize_same_results(ex):
    for cs in (1, 2, 7, 1000):
        assert list(ex.map(square, range(50), chunksize=cs, timeout=T)) == [x * x for x in range(50)]
    with pytest.raises(ValueError):
        ex.map(square, range(3), chunksize=0)


def test_many_small_submits(ex):
    fs = [ex.submit(square, i) for i in range(3000)]
    done, not_done = cf.wait(fs, timeout=T)
    assert not not_done
    assert [f.result() for f in fs] == [i * i for i in range(3000)]


def test_wait_and_as_completed_accept_the_futures(ex):
    slow = ex.submit(sleep_then, "slow", 0.5)
    fast = ex.submit(sleep_then, "fast", 0.0)
    done, not_done = cf.wait([slow, fast], timeout=T, return_when=cf.FIRST_COMPLETED)
    assert fast in done
    got = [f.result() for f in cf.as_completed([slow, fast], timeout=T)]
    assert sorted(got) == ["fast", "slow"]


def test_exception_type_and_remote_traceback(ex):
    f = ex.submit(fail_on, 3, 3)
    with pytest.raises(MyError, match="item 3 failed") as info:
        f.result(timeout=T)
    # As ProcessPoolExecutor: the standard library's own _RemoteTraceback.
    assert type(info.value.__cause__) is _RemoteTraceback
    assert isinstance(RemoteTraceback("x"), _RemoteTraceback)   # what maps set
    assert "fail_on" in str(info.value.__cause__)
    assert isinstance(f.exception(timeout=T), MyError)


def test_map_raises_when_the_failing_result_is_reached(ex):
    it = ex.map(fail_on, range(6), [4] * 6, timeout=T)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(MyError):
        next(it)


def test_one_failure_does_not_affect_its_batch(ex):
    fs = [ex.submit(fail_on, i, 5) for i in range(10)]
    for i, f in enumerate(fs):
        if i == 5:
            assert isinstance(f.exception(timeout=T), MyError)
        else:
            assert f.result(timeout=T) == i


def test_unpicklable_argument_and_result_fail_only_their_future(ex):
    ok1 = ex.submit(square, 2)
    bad_arg = ex.submit(square, threading.Lock())
    ok2 = ex.submit(square, 3)
    bad_res = ex.submit(return_lock)
    assert ok1.result(timeout=T) == 4 and ok2.result(timeout=T) == 9
    # PicklingError, as ProcessPoolExecutor's callers catch (the cause: pickle's TypeError).
    with pytest.raises(pickle.PicklingError, match="pickle") as info:
        bad_arg.result(timeout=T)
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(pickle.PicklingError, match="pickle"):
        bad_res.result(timeout=T)


def test_lambdas_and_closures(ex):
    k = 5
    assert ex.submit(lambda x: x + k, 1).result(timeout=T) == 6
    assert list(ex.map(lambda x: x * k, range(4), timeout=T)) == [0, 5, 10, 15]


def test_map_timeout_counts_from_the_call(ex):
    it = ex.map(sleep_then, [1, 2], [0.0, 5.0], timeout=0.5)
    time.sleep(0.6)  # the timeout is spent before the first next()
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        list(it)
    assert time.monotonic() - t0 < 4.0  # it did not wait for the 5 s item


def test_future_result_timeout(ex):
    f = ex.submit(sleep_then, 1, 0.5)
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.01)
    assert f.result(timeout=T) == 1


def test_cancel_a_pending_future():
    with Executor(max_workers=1) as e:
        blocker = e.submit(sleep_then, 0, 0.5)
        # Two batches can be in flight on one worker; the rest are queued.
        fs = [e.submit(sleep_then, i, 0.2) for i in range(1, 8)]
        assert fs[-1].cancel()
        assert fs[-1].cancelled()
        with pytest.raises(cf.CancelledError):
            fs[-1].result(timeout=T)
        assert blocker.result(timeout=T) == 0
        assert [f.result(timeout=T) for f in fs[:-1]] == list(range(1, 7))


def test_shutdown_waits_for_pending_work(tmp_path):
    e = Executor(max_workers=2)
    fs = [e.submit(sleep_then, i, 0.05) for i in range(20)]
    e.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == list(range(20))
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(square, 1)


def test_shutdown_right_after_submit_waits_for_every_task():
    # shutdown(wait=True) straight after the submits, while an idle runner
    # wakes and hands on what it cannot take to runners it starts itself:
    # those, started after shutdown began, are waited for too.
    for _ in range(15):
        e = Executor(max_workers=2)
        assert e.submit(square, 3).result(timeout=T) == 9   # leaves a runner idle
        fs = [e.submit(sleep_then, i, 0.01) for i in range(6)]
        e.shutdown(wait=True)
        assert [f.done() for f in fs] == [True] * 6
        assert [f.result(timeout=0) for f in fs] == list(range(6))


def test_shutdown_cancel_futures():
    e = Executor(max_workers=1)
    fs = [e.submit(sleep_then, i, 0.2) for i in range(30)]
    time.sleep(0.1)
    e.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in fs)
    cancelled = [f for f in fs if f.cancelled()]
    finished = [f for f in fs if not f.cancelled()]
    assert cancelled, "pending futures were not cancelled"
    assert finished, "running futures must complete, not be cancelled"
    assert [f.result() for f in finished] == [fs.index(f) for f in finished]


def test_shutdown_without_wait_finishes_pending_work():
    e = Executor(max_workers=2)
    fs = [e.submit(sleep_then, i, 0.05) for i in range(6)]
    e.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        e.submit(square, 1)
    done, not_done = cf.wait(fs, timeout=T)
    assert not not_done and [f.result() for f in fs] == list(range(6))
    pool = e.pool
    deadline = time.monotonic() + T
    while not pool.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.closed  # the workers stop once the work is done


def test_context_manager_stops_its_workers():
    with Executor(max_workers=2) as e:
        pids = set(e.map(pid, range(20), timeout=T))
    assert pids
    deadline = time.monotonic() + T
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)


def test_worker_crash_breaks_the_executor(tmp_path):
    e = Executor(max_workers=2)
    try:
        assert e.submit(square, 3).result(timeout=T) == 9
        long = e.submit(sleep_then, 1, 20.0)
        crash = e.submit(suicide)
        with pytest.raises(BrokenProcessPool):
            crash.result(timeout=T)
        # The other running future fails too (ProcessPoolExecutor's behaviour),
        # and promptly: the broken executor's workers are stopped.
        with pytest.raises(BrokenProcessPool):
            long.result(timeout=T)
        with pytest.raises(BrokenProcessPool):
            e.submit(square, 1)
        assert "broken" in repr(e)
    finally:
        e.shutdown(wait=True)
    assert e.pool.closed


def test_on_a_given_pool_leaves_it_running():
    with Pool(2) as pool:
        with Executor(pool=pool) as e:
            assert e.submit(square, 4).result(timeout=T) == 16
            assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]
        assert not pool.closed
        assert list(pool.map(square, range(3))) == [0, 1, 4]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Executor(max_workers=0)
    with pytest.raises(TypeError):
        Executor(max_workers="2")
    e = Executor(max_workers=1)
    with pytest.raises(TypeError):
        e.submit(42)
    e.shutdown()


def test_interpreter_exit_waits_for_pending_work_and_leaves_no_process(tmp_path):
    # As concurrent.futures: work submitted and never waited for still runs
    # before the interpreter exits; then the workers are gone.
    import subprocess
    import sys
    import textwrap
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, %r)
        from pmaprt import Executor

        def write(path, i):
            time.sleep(0.05)
            with open(path + str(i), "w") as f:
                f.write(str(os.getpid()))

        ex = Executor(max_workers=2)
        for i in range(6):
            ex.submit(write, %r, i)
        print(" ".join(map(str, ex.pool.pids())), flush=True)
    """) % (repo, str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=T)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out%d" % i for i in range(6)]
    pids = [int(p) for p in proc.stdout.split()]
    deadline = time.monotonic() + T
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)
