"""Replacement workers fork from a preloaded zygote once a pool has lost a
worker (their speed is a benchmark: bench/reliability.py). Here: that they
do, that each is its own worker (NumPy's global generator reseeded), and
that nothing outlives the pool or its parent. Every wait is bounded."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from pmaprt import Pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pid(_=None):
    return os.getpid()


def np_draw(_=None):
    import numpy as np
    return os.getpid(), float(np.random.random())


def wait_until(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def replace(p, w):
    """Kill worker w and run maps until its replacement serves; its pid."""
    old = p.pids()[w]
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: (list(p.map(pid, range(4), inline=False)), p.pids()[w] != old)[1], 60)
    return p.pids()[w]


def zygote_ready(p):
    return p._res.zygote.usable()


def test_replacements_are_forks_of_one_preloaded_zygote():
    with Pool(2) as p:
        first = replace(p, 0)       # the first loss: a fresh interpreter, and the zygote starts
        assert psutil.Process(first).ppid() == os.getpid()
        assert wait_until(lambda: zygote_ready(p), 60)
        zygote = p._res.zygote.proc.pid
        assert psutil.Process(zygote).ppid() == os.getpid()
        for w in range(4):
            assert psutil.Process(replace(p, w % 2)).ppid() == zygote
        assert set(p.map(pid, range(200), inline=False)) <= set(p.pids())
        # each fork is its own worker: NumPy's global generator is reseeded
        # (an SPMD map runs shard i on worker i: both forks draw)
        draws = dict(p.map(np_draw, range(2), axis_name="i"))
        assert sorted(draws) == sorted(p.pids()) and len(set(draws.values())) == 2, draws
    assert wait_until(lambda: not psutil.pid_exists(zygote)
                      or psutil.Process(zygote).status() == psutil.STATUS_ZOMBIE, 10)


def test_parent_killed_takes_the_zygote_and_its_workers_along(tmp_path):
    code = textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, %r)
        from pmaprt import Pool
        def pid(x):
            return os.getpid()
        p = Pool(2)
        for w in range(3):
            old = p.pids()[w %% 2]
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while p.pids()[w %% 2] == old or not p._res.zygote.usable():
                list(p.map(pid, range(4), inline=False))
                assert time.monotonic() < deadline
        print(p._res.zygote.proc.pid, *p.pids(), flush=True)
        time.sleep(60)
    """ % REPO)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in child.stdout.readline().split()]
        assert len(pids) == 3
        child.send_signal(signal.SIGKILL)
        child.wait(30)

        def gone():
            for q in pids:
                try:
                    if psutil.Process(q).status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    pass
            return True
        assert wait_until(gone, 10), pids
    finally:
        child.kill()
        child.wait(10)
