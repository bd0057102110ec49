"""A worker that dies as it starts (before the parent's start message) is a
worker death like any other: it is replaced and the map, or the call, goes
on. Every wait here is bounded (the maps' own timeouts and the test's)."""
import os
import signal

import pytest

from pmaprt import Pool

from _procs import kill_once_at, square_work, worker_pid as pid

PER_TEST_S = 120


@pytest.fixture
def killed_starts(monkeypatch):
    """kill(numbers): the process of each listed worker start (counted from 0
    in this test) is killed, and reaped, before the parent sends it its
    start message."""
    starts = [0]
    doomed = set()
    real = Pool._start_process

    def start(self, w, sock):
        proc = real(self, w, sock)
        k, starts[0] = starts[0], starts[0] + 1
        if k in doomed:
            proc.kill()
            proc.wait(30)
        return proc

    monkeypatch.setattr(Pool, "_start_process", start)
    return doomed.update


def test_a_pool_whose_first_worker_dies_before_its_start_message(killed_starts):
    killed_starts({0})
    with Pool(2) as p:
        assert list(p.map(abs, range(-50, 0), inline=False, timeout=PER_TEST_S)) == \
            list(range(50, 0, -1))
        assert len(set(p.pids())) == 2


def test_a_replacement_that_dies_before_its_start_message_is_replaced(killed_starts, tmp_path):
    killed_starts({2, 3})      # the first two replacements (starts 0 and 1 are the pool's)
    xs = [(x, 17, str(tmp_path / "m")) for x in range(200)]
    with Pool(2) as p:
        got = list(p.map(kill_once_at, xs, chunksize=4, retries=3, timeout=PER_TEST_S))
        assert got == [x * x for x in range(200)]
        # a second death, its replacement killed too: still a working pool
        xs = [(x, 3, str(tmp_path / "n")) for x in range(20)]
        assert list(p.map(kill_once_at, xs, chunksize=1, retries=3, timeout=PER_TEST_S)) == \
            [x * x for x in range(20)]


def test_apply_after_a_replacement_died_before_its_start_message(killed_starts):
    killed_starts({2})
    with Pool(2) as p:
        victims = p.pids()
        for q in victims:       # no worker left: apply waits for the replacements
            os.kill(q, signal.SIGKILL)
        for _ in range(20):
            assert p.apply(pid) in p.pids()
        assert not set(victims) & set(p.pids())


def test_chaos_with_replacements_killed_as_they_start():
    """Workers SIGKILLed at random, and replacements killed as soon as their
    pid shows, some before they are ready: with retries every item arrives
    exactly once, in order."""
    import random
    import threading
    import time
    from pmaprt._shm import W_STATE, WSTATE_READY

    xs = range(60_000)
    want = [square_work(x) for x in xs]
    rng = random.Random(18)
    killed = {"running": 0, "starting": 0}
    stop = threading.Event()
    with Pool(2) as p:
        def killer():
            known = set(p.pids())
            next_kill = time.monotonic() + rng.uniform(0.02, 0.1)
            while not stop.is_set() and killed["starting"] < 6:
                time.sleep(0.001)
                pids = p.pids()
                for w, q in enumerate(pids):
                    if q in known:
                        continue
                    known.add(q)
                    r = p._r
                    ready = r is not None and r.load32(p._layout.worker(w) + W_STATE) == WSTATE_READY
                    if rng.random() < 0.6:
                        try:
                            os.kill(q, signal.SIGKILL)
                            killed["running" if ready else "starting"] += 1
                        except ProcessLookupError:
                            pass
                if time.monotonic() >= next_kill and killed["running"] < 10:
                    next_kill = time.monotonic() + rng.uniform(0.02, 0.1)
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        killed["running"] += 1
                    except (ProcessLookupError, IndexError):
                        pass

        it = p.map(square_work, xs, retries=3, chunksize=32, timeout=PER_TEST_S)
        first = next(it)
        t = threading.Thread(target=killer)
        t.start()
        try:
            got = [first] + list(it)
        finally:
            stop.set()
            t.join(30)
        assert got == want
        assert it.stats.items == len(xs)
        assert killed["starting"] >= 1, killed
        assert list(p.map(square_work, range(100), inline=False)) == want[:100]
