"""Reliability: retries, per-item timeouts, on_error="return", worker
recycling, the memory guard, chaos, soak, and the parent's own death.

Functions the workers run are module-level: workers import this module by
name (the pool hands them the parent's sys.path).
"""
import gc
import itertools
import os
import random
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
from pmaprt import _memguard

from _procs import kill_once_at, once, square_work, wait_until, worker_pid  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- functions for the workers


def exit_at(args):
    x, at = args
    if x == at:
        os._exit(3)
    return x * x


def sleep_at(args):
    x, at, seconds = args
    if x == at:
        time.sleep(seconds)
    return x * x


def sleep_once_at(args):
    x, at, marker = args
    if x == at and once(marker):
        time.sleep(60)
    return x * x


def raise_on_multiples_of_7(x):
    if x % 7 == 3:
        raise ValueError("bad item %d" % x)
    return -x


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this result refuses to be pickled")


def unpicklable_at_4(x):
    return Unpicklable() if x == 4 else x


def big_bytes(x):
    return b"\x01" * ((2 << 30) + 17)


def kb_block(x):
    return bytes(100_000)


def identity(x):
    return x


def square(x):
    return x * x


# --- helpers


def is_alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def child_pids():
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "multiprocessing" not in " ".join(_cmd(p))}


def _cmd(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def shm_entries():
    # Entries of other libraries (joblib, loky semaphores) are not ours.
    from conftest import shm_entries as entries
    return entries()


@pytest.fixture(scope="module")
def pool():
    p = Pool(2)
    yield p
    p.terminate()


def triples(xs, *rest):
    return [(x,) + rest for x in xs]


# --- retries

@pytest.mark.parametrize("source", ["index", "feed"])
def test_retries_rerun_the_chunk_of_a_killed_worker(pool, tmp_path, source):
    xs = list(range(300))
    items = triples(xs, 137, str(tmp_path / "m"))
    src = items if source == "index" else iter(items)
    it = pool.map(kill_once_at, src, retries=1, chunksize=16)
    assert list(it) == [x * x for x in xs]
    assert it.stats.lost_chunks == 1 and it.stats.retried == 1
    assert it.stats.items == len(xs)   # each item delivered exactly once


@pytest.mark.parametrize("source", ["index", "feed"])
def test_retries_spent_names_item_signal_and_exit(pool, source):
    items = [(x, 11) for x in range(40)]
    src = items if source == "index" else iter(items)
    got = []
    with pytest.raises(WorkerCrashedError) as ei:
        for r in pool.map(exit_at, src, retries=2, chunksize=4):
            got.append(r)
    msg = str(ei.value)
    assert "item 11" in msg and "exited with code 3" in msg and "after 2 retries" in msg, msg
    assert ei.value.exitcode == 3 and ei.value.items == (11, 12)
    assert got == [x * x for x in range(11)]   # everything before it, in order
    assert list(pool.map(square, range(50))) == [x * x for x in range(50)]


def test_sigkill_past_retries_mentions_the_oom_killer(pool, tmp_path):
    # retries=0 with progress tracking (on_error="return") names the exact item.
    out = list(pool.map(kill_once_at, triples(range(30), 9, str(tmp_path / "m")),
                        on_error="return", chunksize=8))
    err = out[9]
    assert isinstance(err, WorkerCrashedError)
    assert "SIGKILL" in str(err) and "out-of-memory" in str(err) and "item 9" in str(err)
    assert out[:9] == [x * x for x in range(9)] and out[10:] == [x * x for x in range(10, 30)]


def test_retries_never_duplicate_side_effect_free_results(pool, tmp_path):
    # Ordered and unordered: every index exactly once.
    items = triples(range(500), 250, str(tmp_path / "m"))
    got = sorted(pool.imap_unordered(kill_once_at, items, retries=1, chunksize=8))
    assert got == sorted(x * x for x in range(500))


# --- timeouts

@pytest.mark.parametrize("source", ["index", "feed"])
def test_timeout_kills_a_stuck_worker_and_raises_timeouterror(pool, source):
    items = [(x, 5, 60) for x in range(12)]
    src = items if source == "index" else iter(items)
    got = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"item 5 .*timeout=0.5s") as ei:
        for r in pool.map(sleep_at, src, timeout=0.5, chunksize=3):
            got.append(r)
    assert time.monotonic() - t0 < 30
    assert got == [x * x for x in range(5)]
    assert "was killed and replaced" in str(ei.value)
    assert list(pool.map(square, range(20))) == [x * x for x in range(20)]


def test_timeout_with_retries_runs_the_item_again(pool, tmp_path):
    items = triples(range(10), 4, str(tmp_path / "m"))
    it = pool.map(sleep_once_at, items, timeout=0.5, retries=1, chunksize=2)
    assert list(it) == [x * x for x in range(10)]
    assert it.stats.retried == 1


def test_timeout_does_not_touch_items_that_progress(pool):
    # Each item takes 0.05 s, far under the timeout; a chunk of many such items
    # takes longer than the timeout in all, and must not be killed.
    items = [(x, x, 0.05) for x in range(24)]
    assert list(pool.map(sleep_at, items, timeout=0.3, chunksize=12)) == [x * x for x in range(24)]


# --- on_error="return"

@pytest.mark.parametrize("source", ["index", "feed"])
def test_on_error_return_puts_exceptions_in_place(pool, source):
    xs = list(range(50))
    out = list(pool.map(raise_on_multiples_of_7, xs if source == "index" else iter(xs),
                        on_error="return", chunksize=5))
    assert len(out) == 50
    for x, r in zip(xs, out):
        if x % 7 == 3:
            assert type(r) is ValueError and str(r) == "bad item %d" % x
            assert isinstance(r.__cause__, RemoteTraceback)
            assert "raise_on_multiples_of_7" in str(r.__cause__)
            assert any("item %d" % x in n for n in r.__notes__)
        else:
            assert r == -x


def test_on_error_return_unordered_and_timeouts(pool):
    out = list(pool.map(sleep_at, [(x, 3, 60) for x in range(8)], timeout=0.5, on_error="return"))
    assert isinstance(out[3], TimeoutError)
    assert out[:3] + out[4:] == [x * x for x in range(8) if x != 3]
    got = list(pool.imap_unordered(raise_on_multiples_of_7, range(30), on_error="return"))
    assert len(got) == 30
    assert sum(isinstance(r, ValueError) for r in got) == sum(1 for x in range(30) if x % 7 == 3)


def test_on_error_return_unpicklable_result(pool):
    out = list(pool.map(unpicklable_at_4, range(8), on_error="return"))
    assert isinstance(out[4], TypeError) and "item 4" in str(out[4])
    assert out[:4] + out[5:] == [0, 1, 2, 3, 5, 6, 7]


# --- recycling

def test_max_items_per_worker_replaces_workers():
    with Pool(2) as p:
        pids = list(p.map(worker_pid, range(200), max_items_per_worker=25, chunksize=5))
        assert len(pids) == 200
        # 200 items at most 25 per process: at least 8 processes served them.
        assert len(set(pids)) >= 8
        assert p.recycled >= 6
        assert list(p.map(square, range(100))) == [x * x for x in range(100)]


def test_pool_level_max_items_per_worker():
    with Pool(1, max_items_per_worker=10) as p:
        pids = list(p.map(worker_pid, iter(range(50)), chunksize=5))
        assert len(set(pids)) == 5
        counts = [pids.count(q) for q in set(pids)]
        assert max(counts) <= 10


# --- the memory guard

def test_memory_guard_holds_back_feeding(pool, monkeypatch):
    pulled = [0]

    def gen():
        for i in itertools.count():
            pulled[0] += 1
            yield i

    def lead(floor):
        pulled[0] = 0
        it = pool.map(square, gen(), chunksize=1, inline=False, memory_floor=floor)
        worst = 0
        for k, r in enumerate(itertools.islice(it, 300)):
            assert r == k * k
            worst = max(worst, pulled[0] - (k + 1))
        it.close()
        return worst

    assert lead(0) > 3      # without the guard, chunks run ahead of the consumer
    monkeypatch.setattr(_memguard, "available_bytes", lambda: 0)
    assert lead(1 << 40) <= 2   # memory "low": one chunk in flight, and progress


def test_unbounded_generator_runs_in_bounded_memory(pool):
    proc = psutil.Process()
    it = pool.map(kb_block, itertools.count(), inline=False)
    for r in itertools.islice(it, 200):
        pass
    base = proc.memory_info().rss
    for r in itertools.islice(it, 3000):   # 300 MB of results pass through
        assert len(r) == 100_000
    grown = proc.memory_info().rss - base
    it.close()
    assert grown < 120 << 20, "the parent grew by %d MB" % (grown >> 20)


# --- chaos

CHAOS_ITEMS = 100_000


def test_chaos_random_sigkills_with_retries():
    xs = range(CHAOS_ITEMS)
    want = [square_work(x) for x in xs]
    rng = random.Random(1234)
    kills = []
    stop = threading.Event()
    with Pool(2) as p:
        def killer():
            seen = {}   # pid -> its rank's chunk count when first seen
            while not stop.is_set():
                if len(kills) < 12:
                    time.sleep(rng.uniform(0.03, 0.12))
                    pids = p.pids()
                    if not pids or stop.is_set():
                        return
                    pid = rng.choice(pids)
                elif it.stats.lost_chunks or len(kills) >= 60:
                    return
                else:
                    # The seeded kills can all miss work (a replacement still
                    # starting, a worker loading the job, a chunk whose record
                    # already arrived): until one costs a chunk, kill only
                    # workers seen finishing chunks since they started.
                    time.sleep(0.01)
                    pids = p.pids()
                    ws = it.stats.workers
                    for rank, q in enumerate(pids):
                        seen.setdefault(q, ws[rank].chunks)
                    busy = [q for rank, q in enumerate(pids)
                            if q not in kills and ws[rank].chunks > seen[q] + 1]
                    if not busy:
                        continue
                    pid = rng.choice(busy)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

        it = p.map(square_work, xs, retries=3, chunksize=64)
        first = next(it)
        t = threading.Thread(target=killer)
        t.start()
        try:
            got = [first] + list(it)
        finally:
            stop.set()
            t.join(30)
        assert got == want
        assert it.stats.items == CHAOS_ITEMS
        assert kills, "the killer never fired"
        assert it.stats.lost_chunks >= 1


# --- soak

SOAK_CYCLES = int(os.environ.get("PMAPRT_SOAK_CYCLES", "60"))
SOAK_TASKS = int(os.environ.get("PMAPRT_SOAK_TASKS", "1000000"))


@pytest.mark.slow
def test_soak_pool_cycles_and_tiny_tasks_leak_nothing():
    gc.collect()
    fds0, kids0, shm0 = open_fds(), child_pids(), shm_entries()
    for i in range(SOAK_CYCLES):
        with Pool(2) as p:
            assert list(p.map(square, range(i, i + 50), inline=False)) == \
                [x * x for x in range(i, i + 50)]
    with Pool(2) as p:
        total = sum(p.map(identity, range(SOAK_TASKS), inline=False))
        assert total == SOAK_TASKS * (SOAK_TASKS - 1) // 2
    gc.collect()
    assert wait_until(lambda: child_pids() <= kids0, 10), child_pids() - kids0
    assert open_fds() == fds0
    assert shm_entries() <= shm0


# --- big results

@pytest.mark.slow
def test_a_2gb_result_is_delivered(pool):
    [r] = list(pool.map(big_bytes, [0], inline=False))
    assert len(r) == (2 << 30) + 17 and r[:4] == b"\x01" * 4 and r[-1:] == b"\x01"


# --- bad options

@pytest.mark.parametrize("kw, exc", [
    ({"retries": -1}, ValueError), ({"retries": 1.5}, TypeError),
    ({"timeout": 0}, ValueError), ({"timeout": "1"}, TypeError),
    ({"on_error": "ignore"}, ValueError),
    ({"max_items_per_worker": 0}, ValueError), ({"memory_floor": -5}, ValueError),
])
def test_bad_reliability_options(pool, kw, exc):
    with pytest.raises(exc, match=list(kw)[0]):
        pool.map(square, range(3), **kw)


# --- the parent's death, and pools made in threads

PARENT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import pmaprt
    pool = pmaprt.Pool(2)
    it = pool.map(time.sleep, [0.2] * 1000, inline=False)
    next(it)
    print(" ".join(str(p) for p in pool.pids()), flush=True)
    for _ in it:
        pass
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_parent_killed_leaves_no_worker_and_no_shm(sig):
    shm0 = shm_entries()
    proc = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT.format(repo=REPO)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timer = threading.Timer(30, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    pids = [int(x) for x in line.split()]
    try:
        assert len(pids) == 2, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert all(is_alive(p) for p in pids)
        os.kill(proc.pid, sig)
        proc.communicate(timeout=30)
        assert proc.returncode == -sig
        assert wait_until(lambda: not any(is_alive(p) for p in pids), 5), \
            "workers alive 5 s after the parent got %s" % signal.Signals(sig).name
        assert shm_entries() <= shm0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_pool_created_in_a_thread_that_ends_keeps_its_workers():
    box = {}

    def make():
        p = box["pool"] = Pool(2)
        # The workers are up (and have set up their parent-death signal).
        assert list(p.map(square, range(10), inline=False)) == [x * x for x in range(10)]

    t = threading.Thread(target=make)
    t.start()
    t.join(60)
    p = box["pool"]
    try:
        time.sleep(0.3)   # a parent-death signal tied to the thread would have fired by now
        pids = p.pids()
        assert all(is_alive(q) for q in pids)
        assert list(p.map(square, range(100), inline=False)) == [x * x for x in range(100)]
        assert p.pids() == pids
    finally:
        p.close()


def add_lock(x, lock):
    return x


def test_unpicklable_function_is_a_clear_typeerror(pool):
    import functools
    fn = functools.partial(add_lock, lock=threading.Lock())
    with pytest.raises(TypeError, match="function .* cannot be pickled"):
        pool.map(fn, range(3), inline=False)
    assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]


def test_unordered_map_raises_a_crash_without_waiting_for_the_rest(pool):
    items = [(x, 0, 0.0) for x in range(1, 40)]
    it = pool.imap_unordered(exit_or_sleep, [(0, 0, 0.0)] + items, chunksize=1, inline=False)
    got = []
    with pytest.raises(WorkerCrashedError):
        for r in it:
            got.append(r)
    # The other 39 items take 0.2 s each: the crash (item 0, first to run) is
    # raised before they are all done, not after.
    assert len(got) < 39
    it.close()


def exit_or_sleep(args):
    x, _, _ = args
    if x == 0:
        os._exit(5)
    time.sleep(0.2)
    return x


def test_terminate_from_another_thread_while_a_map_waits():
    p = Pool(2)
    it = p.map(time.sleep, [0.5] * 20, inline=False)
    box = {}

    def consume():
        try:
            for _ in it:
                pass
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)          # the consumer is inside the pool's wait
    p.terminate()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(box.get("e"), pmaprt.PoolClosedError), box


# --- review findings: big records, encode crashes, a busy worker's socket

def mb_or_raise(x):
    if x == 1:
        raise ValueError("bad %d" % x)
    return bytes(1 << 20)


def test_on_error_return_with_results_bigger_than_the_ring(pool):
    # A chunk of 4 MB of results travels as a big record; its flag must survive.
    out = list(pool.map(mb_or_raise, range(8), on_error="return", chunksize=4))
    assert isinstance(out[1], ValueError) and isinstance(out[1].__cause__, RemoteTraceback)
    assert all(isinstance(r, bytes) and len(r) == 1 << 20 for i, r in enumerate(out) if i != 1)


class ExitWhenPickled:
    def __reduce__(self):
        os._exit(5)


def result_kills_pickler_at_1(x):
    return ExitWhenPickled() if x == 1 else x


def test_crash_while_encoding_results_blames_only_the_guilty_item(pool):
    out = list(pool.map(result_kills_pickler_at_1, range(8), chunksize=4, on_error="return"))
    assert isinstance(out[1], WorkerCrashedError)
    assert "exited with code 5" in str(out[1]) and "item 1" in str(out[1])
    assert out[:1] + out[2:] == [0, 2, 3, 4, 5, 6, 7]


def big_then_killed(args):
    x, marker = args
    if x == 1 and once(marker):
        # Killed while the 64 MB result is on its way to the parent.
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        return b"x" * (256 << 20)
    return b"x" * (64 << 20) if x == 1 else x


def test_worker_killed_while_sending_a_big_result_is_retried(pool, tmp_path):
    it = pool.map(big_then_killed, [(x, str(tmp_path / "m")) for x in range(4)],
                  chunksize=1, retries=2)
    first = next(it)
    time.sleep(1.0)   # let the big record start and the worker die under it
    out = [first] + list(it)
    assert out[0] == 0 and out[2:] == [2, 3] and len(out[1]) == 64 << 20


def sleep_if_zero(x):
    if x == 0:
        time.sleep(60)
    return x


def test_timeout_of_item_0_fires_while_other_maps_flood_segments():
    # Every map of a list needs a segment, sent to every worker; a worker
    # stuck in an item reads none of them. The parent must neither block on
    # its socket nor miss the timeout.
    with Pool(2) as p:
        box = {}

        def stuck():
            try:
                box["r"] = list(p.map(sleep_if_zero, [0], timeout=1.0, chunksize=1))
            except Exception as e:
                box["r"] = e

        t = threading.Thread(target=stuck)
        t.start()
        data = list(range(20000))   # too big to travel inside the job slot
        for _ in range(250):
            assert list(p.map(square, data, inline=False))[-1] == 19999 ** 2
        t.join(60)
        assert not t.is_alive()
        assert isinstance(box["r"], TimeoutError), box["r"]
        assert "item 0" in str(box["r"])


def test_workers_killed_inside_jobs_do_not_use_up_the_job_slots(tmp_path):
    # A worker killed inside a job cannot drop its reference to the job's
    # slot; the parent drops it. Else each such death would leave one slot
    # closed for good, and with max_jobs=2 the third map could not be posted.
    with Pool(1, max_jobs=2) as p:
        for k in range(5):
            marker = str(tmp_path / ("killed%d" % k))
            items = [(x, 3, marker) for x in range(20)]
            assert list(p.map(kill_once_at, items, retries=1, inline=False)) == \
                [x * x for x in range(20)]
            assert os.path.exists(marker)
        assert p.apply(square, 7) == 49
        assert list(p.map(square, range(10), inline=False)) == [x * x for x in range(10)]


# --- what a lazy consumer's map holds ahead of it, in bytes (the map's accounting)

def test_a_lazy_consumer_holds_at_most_the_byte_bound_ahead():
    import numpy as np
    from pmaprt._map.window import ahead_bytes

    def gen():
        for i in itertools.count():
            a = np.empty((1 << 20) // 8)
            a.fill(i)
            yield a

    with Pool(2) as p:
        it = p.map(identity, gen())
        state = it._state
        f, book = state.feeder, state.book
        peak = chunk = 0
        for k, a in enumerate(itertools.islice(it, 120)):
            assert a[0] == k
            with p._lock:
                peak = max(peak, f.inflight_bytes + book.held_bytes)
                chunk = max([chunk] + [e[5] for e in f.outstanding.values()])
            if k % 10 == 0:
                time.sleep(0.02)
        per_item = f.in_item_bytes + state.costs.item_bytes
        it.close()
    chunk_bytes = chunk * per_item
    assert per_item >= 2 << 20
    # items in flight and results not taken: within the bound, deterministically,
    # and so within 4 x (workers x chunk bytes)
    assert peak <= ahead_bytes(2, chunk_bytes), (peak, chunk, per_item)
    assert peak <= 4 * 2 * chunk_bytes
