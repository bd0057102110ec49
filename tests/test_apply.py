"""Pool.apply: one call on one worker, through the task path (_runtime/task.py), with
the guarantees of a map: the user's exception, a crash named by its exit,
unpicklable values named, the pool usable after each, Ctrl-C prompt."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

import pmaprt
from pmaprt import Pool, RemoteTraceback, WorkerCrashedError

T = 30  # seconds: the bound on every wait in this file
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pool():
    with Pool(2) as p:
        yield p


class Boom(Exception):
    pass


def add(a, b=0, *, c=0):
    return a + b + c


def boom(x):
    raise Boom("bad %r" % (x,))


def exit_with(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def return_lock():
    return threading.Lock()


def getpid():
    return os.getpid()


def total(a):
    return float(np.asarray(a).sum())


def test_results_args_and_kwargs(pool):
    assert pool.apply(add, 2) == 2
    assert pool.apply(add, 2, 3) == 5
    assert pool.apply(add, 2, 3, c=4) == 9
    assert pool.apply(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    assert pool.apply(getpid) in pool.pids()


def test_lambdas_and_closures_see_their_current_values(pool):
    assert pool.apply(lambda x: x + 1, 1) == 2
    state = [1]

    def read():
        return state[0]

    assert pool.apply(read) == 1
    state[0] = 2   # a by-value function is pickled at each call, never from a cache
    assert pool.apply(read) == 2


def test_bound_method_sees_its_object_now(pool):
    class Box:
        def __init__(self):
            self.v = 1

        def get(self):
            return self.v

    b = Box()
    assert pool.apply(b.get) == 1
    b.v = 5
    assert pool.apply(b.get) == 5


def test_exception_type_traceback_and_pid(pool):
    with pytest.raises(Boom, match="bad 7") as ei:
        pool.apply(boom, 7)
    e = ei.value
    assert isinstance(e.__cause__, RemoteTraceback)
    assert "boom" in str(e.__cause__)
    assert any("worker pid" in n for n in e.__notes__)
    assert pool.apply(add, 1, 1) == 2


def test_many_failures_free_their_slots(pool):
    # More failing calls than the board has slots: each gives its slot back.
    for i in range(80):
        with pytest.raises(Boom):
            pool.apply(boom, i)
    assert pool.apply(add, 3, 4) == 7


@pytest.mark.parametrize("fn,args,match", [
    (exit_with, (7,), "exited with code 7"),
    (kill_self, (), "SIGKILL"),
])
def test_crash_names_the_exit_and_the_pool_goes_on(fn, args, match):
    with Pool(2) as p:
        before = set(p.pids())
        with pytest.raises(WorkerCrashedError, match=match) as ei:
            p.apply(fn, *args)
        assert ei.value.pid in before
        assert p.apply(add, 1, 2) == 3
        assert len(set(p.pids()) - before) == 1   # the dead worker was replaced


def test_unpicklable_result_and_argument(pool):
    with pytest.raises(TypeError, match="result of the task.*lock"):
        pool.apply(return_lock)
    with pytest.raises(TypeError, match="lock"):
        pool.apply(add, threading.Lock())
    assert pool.apply(add, 1) == 1


def test_large_arguments_and_results(pool):
    big = bytes(range(256)) * 1000           # larger than a slot's inline area
    assert pool.apply(len, big) == len(big)
    a = np.arange(500_000, dtype=np.float64)
    assert pool.apply(total, a) == float(a.sum())
    out = pool.apply(np.ones, 300_000)        # a large result comes back whole
    assert out.shape == (300_000,) and out.sum() == 300_000


def zeros(n):
    return b"\0" * n


def test_results_each_side_of_the_slot_area(pool):
    # Up to the slot's inline area a result comes back in the slot, beyond it
    # through the worker's result ring: both whole, call after call.
    from pmaprt._shm import INLINE_DESC
    for n in (0, 1, INLINE_DESC - 64, INLINE_DESC + 1, 4 * INLINE_DESC, 10):
        for _ in range(3):
            assert pool.apply(zeros, n) == b"\0" * n


def test_a_task_whose_worker_died_after_its_result_keeps_the_result():
    # The worker stored the result in the slot, then died before it cleared
    # its current-chunk words: the parent's crash path must take the result,
    # not report a crash.
    import mmap

    from pmaprt import _core, _serialize, _shm
    from pmaprt._runtime import task as _task
    mm = mmap.mmap(-1, 4096)
    r = _core.Region(mm)
    buf = memoryview(mm)
    t = _task.Task()
    t.gen, t.off, t.r, t.buf, t.base = 1, 0, r, buf, 512
    assert not t.has_news()
    payload = _serialize.dumps_list([{"answer": 42}])
    buf[512: 512 + len(payload)] = payload
    r.store64(_shm.S_TASK_LEN, len(payload))
    r.store32(_shm.S_TASK_DONE, 1)
    t.on_lost("worker 0 (pid 1) was killed by signal SIGKILL (9)", 1, -9, 0, 1, 0, None)
    assert t.exc is None and t.has_news()       # not a crash: the result waits in the slot
    t.take_slot()
    assert t.done and t.exc is None and t.value == {"answer": 42}
    r.release()
    buf.release()
    mm.close()


def test_calls_from_many_threads(pool):
    errors = []

    def run(k):
        try:
            for i in range(40):
                assert pool.apply(add, k, i) == k + i
        except BaseException as e:   # reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(T)
    assert not any(t.is_alive() for t in ts)
    assert errors == []


def test_apply_mixes_with_a_running_map(pool):
    it = pool.map(add, range(1000), chunksize=10)
    first = [next(it) for _ in range(5)]
    assert pool.apply(add, 40, 2) == 42
    assert first + list(it) == list(range(1000))


def test_max_items_per_worker_recycles(pool):
    with Pool(1, max_items_per_worker=3) as p:
        pids = [p.apply(getpid) for _ in range(7)]
    assert len(set(pids)) == 3 and pids[:3] == [pids[0]] * 3


def test_closed_pool_and_bad_function():
    p = Pool(1)
    p.close()
    with pytest.raises(pmaprt.PoolClosedError):
        p.apply(add, 1)
    with Pool(1) as q:
        with pytest.raises(TypeError, match="not callable"):
            q.apply(5)


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pmaprt import Pool
    p = Pool(2)
    print(" ".join(map(str, p.pids())), flush=True)
    p.apply(time.sleep, 60)
""")


def test_ctrl_c_during_apply_is_prompt_and_leaves_no_worker():
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=REPO)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        timer = threading.Timer(T, proc.kill)
        timer.start()
        try:
            pids = [int(x) for x in proc.stdout.readline().split()]
        finally:
            timer.cancel()
        assert len(pids) == 2
        time.sleep(0.5)    # the call is running
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=T)
        assert time.monotonic() - t0 < 10
        assert "KeyboardInterrupt" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(q) and psutil.Process(q).status() != psutil.STATUS_ZOMBIE
              for q in pids):
        assert time.monotonic() < deadline, "workers left after Ctrl-C"
        time.sleep(0.05)


# --- the hot spinner (H_HOT_SPINNER): a worker that has just answered a task
# spins for the next one, and a task posted meanwhile skips the wake call.

def sleep_then(x, s):
    time.sleep(s)
    return x


def test_a_long_task_does_not_hold_back_the_next_from_another_thread():
    # A worker takes the hot spinner word as it answers a task. If it then
    # found another task waiting and ran it still holding the word, a task
    # posted meanwhile would wake no sleeping worker: it would wait for a
    # worker's 1 s idle wake-up (or for the long task).
    with Pool(2) as p:
        for _ in range(50):
            assert p.apply(add, 1) == 1
        out = {}

        def call(key, *args):
            out[key] = p.apply(sleep_then, *args)

        # Both workers busy (0.6 s and 0.3 s); the long task waits on the board
        # and goes to the worker that answers first, as it takes the word.
        ts = [threading.Thread(target=call, args=("a", 1, 0.6))]
        ts[0].start()
        time.sleep(0.1)
        ts.append(threading.Thread(target=call, args=("b", 2, 0.3)))
        ts[1].start()
        time.sleep(0.1)
        ts.append(threading.Thread(target=call, args=("long", 7, 4.0)))
        ts[2].start()
        time.sleep(0.9)     # both answered; one runs the long task, one sleeps
        lat = []
        for _ in range(5):
            t0 = time.monotonic()
            assert p.apply(add, 2, 3) == 5
            lat.append(time.monotonic() - t0)
        for t in ts:
            t.join(T)
        assert out == {"a": 1, "b": 2, "long": 7}
        # A plain round trip is well under a millisecond; a woken-by-timeout
        # one takes up to 1 s.
        assert max(lat) < 0.3, lat


def _post_now(p, fn, *args):
    # Pool.apply's first half (post without waiting), to post two tasks
    # within microseconds of each other.
    from pmaprt._runtime import task as _task
    task = _task.Task()
    with p._lock:
        gen, slot, off = p._post_task(task, _task.encode(fn, args, {}))
    return task, (gen, slot, off)


def _result(p, posted, deadline):
    task, (gen, slot, off) = posted
    try:
        while not task.has_news():
            assert time.monotonic() < deadline, "the task never ran"
            p.wait(task)
        if not task.done:
            task.take_slot()        # as Pool.apply does
    finally:
        p._retire(gen, slot, off)
    return task.value


def test_two_tasks_posted_during_one_hot_spin_both_start_at_once():
    # The worker that answered the last call spins for the next one; a post
    # that finds it spinning skips the wake call, but only one post may: a
    # second task posted during the same spin must wake a sleeping worker, or
    # it waits behind the first (0.5 s here) or for the 1 s idle wake-up.
    with Pool(2) as p:
        lat = []
        for _ in range(5):
            assert p.apply(add, 1) == 1     # a worker answers and spins now
            slow = _post_now(p, sleep_then, 1, 0.5)
            t0 = time.monotonic()
            quick = _post_now(p, add, 2, 3)
            assert _result(p, quick, t0 + T) == 5
            lat.append(time.monotonic() - t0)
            assert _result(p, slow, t0 + T) == 1
        assert max(lat) < 0.3, lat


def test_a_hot_spinner_killed_holding_the_word_blocks_no_task():
    with Pool(2) as p:
        assert p.apply(add, 1) == 1
        r = p._r
        victim = p.pids()[0]
        # As if worker 0 were killed between taking the word and giving it back
        # (once the answering worker has given it back: its spin is 500 us at most).
        deadline = time.monotonic() + T
        while not r.cas64(pmaprt._shm.H_HOT_SPINNER, 0, 1):
            assert time.monotonic() < deadline, "the hot spinner word was never given back"
            time.sleep(0.001)
        assert r.load64(pmaprt._shm.H_HOT_SPINNER) == 1
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        for i in range(20):
            assert p.apply(add, i, 1) == i + 1
        # The first task's post skipped its wake (the word looked taken); the
        # parent clears a dead holder's word and wakes the others.
        assert time.monotonic() - t0 < 5
        assert victim not in p.pids()
