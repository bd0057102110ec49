"""A worker that dies as it starts (before the parent's start message) is a
worker death like any other: it is replaced and the map, or the call, goes
on. Every wait here is bounded (the maps' own timeouts and the test's)."""
import os
import signal

import pytest

from pmaprt import Pool

PER_TEST_S = 120


def once(marker):
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def kill_once_at(args):
    x, at, marker = args
    if x == at and once(marker):
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def pid(_=None):
    return os.getpid()


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
