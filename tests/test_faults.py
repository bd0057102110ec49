"""Faults: what a user of pmaprt relies on when things go wrong.

- A fault-injection table (in the spirit of loky's): a fault raised, a
  sys.exit, an os._exit or a SIGKILL, injected while an item is pickled (in
  the parent), unpickled (in the worker), run, or while its result is pickled
  (in the worker). Each has a defined outcome at the caller, and the same pool
  works afterwards.
- Exceptions arrive as map would raise them: the user's type, the worker's
  traceback as ``__cause__``, the failing index in ``__notes__``, after the
  results before it.
- Unpicklable items and results name the item; lambdas and closures work.
- Ctrl-C and a SIGKILLed parent leave no worker behind.
- Nested pmap in a worker runs serially; bad arguments fail clearly; a
  generator that raises midway behaves as under map.

Functions and classes used by workers are defined at module level: workers
import this module by name (the pool hands them the parent's sys.path).
"""
import concurrent.futures.process
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import pmaprt
from pmaprt import Pool, RemoteTraceback, WorkerCrashedError

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABS_INPUT = range(-50, 50)
ABS_EXPECTED = [abs(x) for x in ABS_INPUT]


# --- helpers (module level: workers import them by reference)

class MyError(Exception):
    """The user's own exception type."""


def act(how):
    """Inject one fault."""
    if how == "raise":
        raise MyError("injected fault")
    if how == "sys.exit":
        sys.exit(3)
    if how == "os._exit":
        os._exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # the signal is delivered before this returns
    raise AssertionError("unknown fault %r" % (how,))


class PickleBomb:
    """Its pickling runs the fault (in the parent for an item, in the worker for a result)."""

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        act(self.how)


def _rebuild_bomb(how):
    act(how)


class UnpickleBomb:
    """Pickles fine; its reconstructor runs the fault where it is unpickled (the worker)."""

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        return (_rebuild_bomb, (self.how,))


class Trigger:
    """A plain picklable item that tells the function which fault to inject."""

    def __init__(self, how):
        self.how = how


def run_fault(x):
    if isinstance(x, Trigger):
        act(x.how)
    return x


def result_fault(x):
    if isinstance(x, Trigger):
        return PickleBomb(x.how)
    return x


def identity(x):
    return x


def raise_at_37(x):
    if x == 37:
        raise MyError("bad item %d" % x)
    return x * 2


def lock_at_3(x):
    if x == 3:
        return threading.Lock()
    return x


def exit_hard_at_7(x):
    if x == 7:
        os._exit(3)
    return x


def nested_pmap(x):
    total = sum(pmaprt.pmap(abs, range(-x, x + 1)))
    pairs = list(pmaprt.starmap(pow, [(x, 2), (2, x)]))
    unordered = sorted(pmaprt.imap_unordered(abs, range(-x, 1)))
    return total, pairs, unordered, len(psutil.Process().children(recursive=True))


def shm_entries():
    """/dev/shm names, less POSIX semaphores and joblib/loky entries (other
    libraries' or other processes'; pmaprt's segments are anonymous memfds)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {n for n in names
            if not n.startswith("sem.") and "loky" not in n and "joblib" not in n}


def child_pids():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def is_alive(pid):
    """A running process with this pid (a zombie counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(pred, timeout):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


def collect(it):
    """Results yielded before the iterator raised, and what it raised."""
    out = []
    try:
        for x in it:
            out.append(x)
    except BaseException as e:  # noqa: B902 - SystemExit is one of the outcomes
        return out, e
    return out, None


def assert_pool_works(pool):
    assert list(pool.map(abs, ABS_INPUT, inline=False)) == ABS_EXPECTED
    assert list(pool.map(abs, ABS_INPUT)) == ABS_EXPECTED
    assert len(pool.pids()) == pool.workers


@pytest.fixture(scope="module")
def pool():
    p = Pool(2)
    yield p
    p.close()


# --- 1. the fault-injection table

WHERE_HOW = (
    [("pickling", how) for how in ("raise", "sys.exit")]  # the parent pickles: it must not exit
    + [(where, how) for where in ("unpickling", "running", "result pickling")
       for how in ("raise", "sys.exit", "os._exit", "SIGKILL")]
)

BAD = 5  # the faulty item's index


def fault_input(where, how):
    bad = {"pickling": PickleBomb, "unpickling": UnpickleBomb}.get(where, Trigger)(how)
    return list(range(BAD)) + [bad] + list(range(BAD + 1, 10))


@pytest.mark.parametrize("where,how", WHERE_HOW)
def test_fault_table(pool, where, how):
    fn = result_fault if where == "result pickling" else run_fault
    out, exc = collect(pool.map(fn, fault_input(where, how), inline=False))
    assert exc is not None, "the map finished: %r" % (out,)

    if how in ("os._exit", "SIGKILL"):
        # The worker died: the map fails at the lost chunk, with the exit named.
        assert isinstance(exc, WorkerCrashedError), repr(exc)
        assert isinstance(exc, concurrent.futures.process.BrokenProcessPool)
        if how == "os._exit":
            assert "exited with code 3" in str(exc)
            assert exc.exitcode == 3
        else:
            assert "SIGKILL" in str(exc)
            assert exc.exitcode == -signal.SIGKILL
        assert exc.pid is not None and exc.pid not in pool.pids()
        assert not is_alive(exc.pid)
        # whatever came before the lost chunk is correct and in order
        assert out == list(range(len(out))) and len(out) <= BAD
    elif where == "pickling":
        # Pickling runs in the parent: the map names the item that cannot be
        # sent, with the item's own exception (MyError, or the SystemExit of
        # its __reduce__) as the cause, after the results of the items before it.
        assert isinstance(exc, TypeError), repr(exc)
        assert "item %d" % BAD in str(exc)
        assert isinstance(exc.__cause__, MyError if how == "raise" else SystemExit)
        assert out == list(range(BAD))
    elif where == "result pickling":
        # The result cannot be sent back: a TypeError names the item and says why.
        assert isinstance(exc, TypeError), repr(exc)
        assert "result of item %d" % BAD in str(exc)
        assert ("injected fault" if how == "raise" else "3") in str(exc)
        assert out == list(range(BAD))
    else:
        # raise / sys.exit in the worker: the exception itself reaches the
        # caller, as map would raise it, with the worker's traceback.
        expected = MyError if how == "raise" else SystemExit
        assert type(exc) is expected, repr(exc)
        if how == "sys.exit":
            assert exc.code == 3
        assert isinstance(exc.__cause__, RemoteTraceback)
        if where == "running":
            assert "run_fault" in str(exc.__cause__)
            assert any("item %d" % BAD in n for n in getattr(exc, "__notes__", ()))
            assert out == list(range(BAD))
        else:
            assert "_rebuild_bomb" in str(exc.__cause__)
            assert out == list(range(len(out))) and len(out) <= BAD

    # The same pool goes on working (dead workers are replaced).
    assert_pool_works(pool)


# --- 2. exceptions as map raises them

@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_exception_type_traceback_index_and_prior_results(pool, chunksize):
    out, exc = collect(pool.map(raise_at_37, range(100), chunksize=chunksize, inline=False))
    assert out == [raise_at_37(x) for x in range(37)]
    assert type(exc) is MyError
    assert str(exc) == "bad item 37"
    assert isinstance(exc.__cause__, RemoteTraceback)
    tb = str(exc.__cause__)
    assert "raise_at_37" in tb and "MyError" in tb and "Traceback" in tb
    notes = getattr(exc, "__notes__", [])
    assert any("item 37" in n for n in notes), notes
    assert_pool_works(pool)


def test_exception_from_pmap_and_starmap(pool):
    with pytest.raises(MyError) as info:
        list(pool.starmap(raise_at_37, [(x,) for x in range(50)], inline=False))
    assert any("item 37" in n for n in info.value.__notes__)
    with pytest.raises(MyError):
        list(pmaprt.pmap(raise_at_37, range(50)))


# --- 3. unpicklable items and results; lambdas and closures

@pytest.mark.parametrize("size", [10, 20000])
def test_unpicklable_item_in_list(pool, size):
    items = list(range(size))
    bad = size // 2
    items[bad] = threading.Lock()
    out, exc = collect(pool.map(identity, items, inline=False))
    assert isinstance(exc, TypeError), repr(exc)
    assert "item %d" % bad in str(exc)
    assert out == list(range(bad))
    assert_pool_works(pool)


def test_unpicklable_item_in_generator(pool):
    def gen():
        yield from range(300)
        yield threading.Lock()
        yield from range(10)

    out, exc = collect(pool.map(identity, gen(), inline=False))
    assert isinstance(exc, TypeError), repr(exc)
    assert "item 300" in str(exc)
    assert out == list(range(300))
    assert_pool_works(pool)


def test_unpicklable_result(pool):
    out, exc = collect(pool.map(lock_at_3, range(10), inline=False))
    assert isinstance(exc, TypeError), repr(exc)
    assert "item 3" in str(exc)
    assert out == [0, 1, 2]
    assert_pool_works(pool)


def test_lambda_and_closure_functions(pool):
    k = 7
    assert list(pool.map(lambda x: x * k, range(20), inline=False)) == [x * 7 for x in range(20)]

    def make_adder(n):
        def add(x):
            return x + n
        return add

    assert list(pool.map(make_adder(3), range(20), inline=False)) == [x + 3 for x in range(20)]
    gen_input = (x for x in range(20))
    assert list(pool.map(lambda x: -x, gen_input, inline=False)) == [-x for x in range(20)]


# The table's last two cells: an item whose pickling calls os._exit or kills
# its own process. Items are pickled in the parent, so the parent is what
# dies, with the code or signal the item chose, as it would calling the item's
# code itself; what pmaprt owes it then is that no worker outlives it.
PICKLE_EXIT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import pmaprt

    class Bomb:
        def __reduce__(self):
            if {how!r} == "os._exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)

    pool = pmaprt.Pool(2)
    assert list(pool.map(abs, range(-50, 50), inline=False)) == [abs(x) for x in range(-50, 50)]
    print(" ".join(str(p) for p in pool.pids()), flush=True)
    list(pool.map(abs, [1, 2, 3, Bomb(), 5], inline=False))
    print("NOT REACHED", flush=True)
""")


@pytest.mark.parametrize("how", ["os._exit", "SIGKILL"])
def test_fault_table_pickling_an_item_that_ends_the_parent(how):
    proc = subprocess.Popen(
        [sys.executable, "-c", PICKLE_EXIT_SCRIPT.format(repo=REPO, how=how)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    lines = out.split("\n")
    pids = [int(x) for x in lines[0].split()]
    assert len(pids) == 2, (out, err)
    assert "NOT REACHED" not in out
    assert proc.returncode == (3 if how == "os._exit" else -signal.SIGKILL), (proc.returncode, err)
    assert_workers_gone(pids, 10)


# --- 4, 5. Ctrl-C and a killed parent leave no worker behind

CHILD_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import pmaprt
    pool = pmaprt.Pool(2)
    it = pool.map(time.sleep, [0.2] * 1000, inline=False)
    next(it)  # the map is running
    print(" ".join(str(p) for p in pool.pids()), flush=True)
    for _ in it:
        pass
    print("FINISHED", flush=True)
""")


def start_child():
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT.format(repo=REPO)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # readline could block forever if the child hangs before printing: bound it.
    timer = threading.Timer(30, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    pids = [int(x) for x in line.split()]
    if len(pids) != 2:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail("the child did not start its pool: %r %s" % (line, err))
    for pid in pids:
        assert is_alive(pid)
    return proc, pids


def assert_workers_gone(pids, timeout):
    left = wait_until(lambda: not [p for p in pids if is_alive(p)], timeout)
    assert left, "workers still alive %.0f s after their parent ended: %s" % (
        timeout, [p for p in pids if is_alive(p)])


@pytest.mark.parametrize("target", ["process group", "parent only"])
def test_ctrl_c_stops_promptly_and_leaves_no_worker(target):
    proc, pids = start_child()
    t0 = time.monotonic()
    try:
        if target == "process group":  # what a terminal's Ctrl-C does
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, "took %.1f s to stop after Ctrl-C" % elapsed
    assert proc.returncode in (-signal.SIGINT, 130, 1), (proc.returncode, err)
    assert "KeyboardInterrupt" in err
    assert_workers_gone(pids, 10)


def test_parent_sigkill_leaves_no_worker():
    proc, pids = start_child()
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_workers_gone(pids, 5)


# --- 6. hygiene after a crash and terminate

def test_no_leaks_after_crash_and_terminate(pool):
    gc.collect()
    shm0, kids0, fds0 = shm_entries(), child_pids(), open_fds()
    p = Pool(2)
    started = set(p.pids())
    assert started <= child_pids()
    with pytest.raises(WorkerCrashedError, match="exited with code 3"):
        list(p.map(exit_hard_at_7, range(20), chunksize=1, inline=False))
    assert list(p.map(abs, ABS_INPUT, inline=False)) == ABS_EXPECTED
    every = started | set(p.pids())
    assert len(every) > 2  # a worker was replaced
    p.terminate()
    assert p.closed
    with pytest.raises(pmaprt.PoolClosedError):
        p.map(abs, [1])
    assert wait_until(lambda: not [q for q in every if is_alive(q)], 10)
    assert wait_until(lambda: child_pids() <= kids0, 10), child_pids() - kids0
    assert shm_entries() <= shm0, shm_entries() - shm0
    del p
    gc.collect()
    assert wait_until(lambda: open_fds() <= fds0, 5), "file descriptors left open: %s" % sorted(
        open_fds() - fds0)
    assert_pool_works(pool)


# --- 7. nested pmap

def test_nested_pmap_runs_serially_in_worker(pool):
    got = list(pool.map(nested_pmap, range(1, 6), chunksize=1, inline=False))
    for x, (total, pairs, unordered, children) in zip(range(1, 6), got):
        assert total == sum(abs(i) for i in range(-x, x + 1))
        assert pairs == [x ** 2, 2 ** x]
        assert unordered == sorted(abs(i) for i in range(-x, 1))
        assert children == 0, "a worker started processes for a nested pmap"


# --- 8. argument checking

@pytest.mark.parametrize("workers,exc", [(0, ValueError), (-1, ValueError), ("x", TypeError),
                                         (1.5, TypeError)])
def test_bad_workers(workers, exc):
    with pytest.raises(exc, match="workers"):
        Pool(workers)
    with pytest.raises(exc, match="workers"):
        list(pmaprt.pmap(abs, [1, 2], workers=workers))
    with pytest.raises(exc, match="workers"):
        list(pmaprt.starmap(abs, [(1,)], workers=workers))


@pytest.mark.parametrize("chunksize,exc", [(0, ValueError), (-1, ValueError), ("x", TypeError)])
def test_bad_chunksize(pool, chunksize, exc):
    with pytest.raises(exc, match="chunksize"):
        list(pool.map(abs, [1, 2], chunksize=chunksize))
    with pytest.raises(exc, match="chunksize"):
        list(pmaprt.pmap(abs, [1, 2], chunksize=chunksize))


def test_non_iterable_input(pool):
    with pytest.raises(TypeError, match="iterable"):
        list(pool.map(abs, 5))
    with pytest.raises(TypeError, match="iterable"):
        list(pool.map(pow, [1], 5))
    with pytest.raises(TypeError, match="iterable"):
        list(pmaprt.pmap(abs, 5))


def test_non_callable_fn(pool):
    with pytest.raises(TypeError, match="callable"):
        list(pool.map(5, [1, 2]))
    with pytest.raises(TypeError, match="callable"):
        list(pmaprt.pmap("abs", [1, 2]))


# --- 9. a generator that raises midway

def raising_generator(n):
    yield from range(n)
    raise MyError("the input failed after %d items" % n)


@pytest.mark.parametrize("n", [0, 3, 500])
@pytest.mark.parametrize("inline", [False, "auto"])
def test_generator_raising_midway(pool, n, inline):
    out, exc = collect(pool.map(abs, raising_generator(n), inline=inline))
    assert out == list(range(n))
    assert type(exc) is MyError
    assert str(exc) == "the input failed after %d items" % n
    assert_pool_works(pool)


# --- found while writing these tests

class CtrlCWhilePickled:
    """Raises KeyboardInterrupt the first time it is pickled: a Ctrl-C that
    arrives while the parent encodes the input."""

    fired = False

    def __reduce__(self):
        if not CtrlCWhilePickled.fired:
            CtrlCWhilePickled.fired = True
            raise KeyboardInterrupt
        return (int, (0,))


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_ctrl_c_while_pickling_input_is_not_swallowed(kind):
    CtrlCWhilePickled.fired = False
    items = [1, 2, CtrlCWhilePickled(), 4]
    with Pool(1) as p:  # a KeyboardInterrupt may end the pool: not the shared one
        with pytest.raises(KeyboardInterrupt):
            list(p.map(identity, items if kind == "list" else iter(items), inline=False))
    assert CtrlCWhilePickled.fired


def test_items_that_need_cloudpickle(pool):
    # The serializer falls back to cloudpickle for items pickle cannot
    # encode (a lambda inside an item); small and large inputs alike.
    for n in (3, 5000):
        items = [(lambda i=i: i) for i in range(n)]
        assert list(pool.map(lambda f: f(), items, inline=False)) == list(range(n))
