"""os.fork() in a process with a live pool: the child starts with no pool
(a fresh one on first use) and never touches the parent's workers or
shared memory; the parent's pool goes on as if nothing happened.

Each case runs as a script in its own process (a fork inside the test
runner would copy the runner), under a timeout: a hang fails the test."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import os, sys, threading, time
sys.path.insert(0, %r)
import pmaprt
from pmaprt import Pool, PoolClosedError

def sq(x):
    return x * x

def slow(x):
    time.sleep(0.002)
    return x * x

def check(it, n, f=sq):
    got = list(it)
    assert got == [f(x) if f is not slow else x * x for x in range(n)], got[:10]

def fork(child):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child()
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.exit(code)      # a normal exit: atexit handlers and finalizers run
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
"""


def run(body):
    out = subprocess.run([sys.executable, "-c", PRELUDE % REPO + textwrap.dedent(body)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_a_child_that_just_exits_leaves_the_parents_pool_working():
    out = run("""
        check(pmaprt.pmap(sq, range(1000), inline=False), 1000)
        pids = pmaprt.default_pool().pids()
        fork(lambda: None)
        fork(lambda: None)
        check(pmaprt.pmap(sq, range(1000), inline=False), 1000)
        assert pmaprt.default_pool().pids() == pids, "the parent's workers were replaced"
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_a_child_that_maps_gets_its_own_pool():
    out = run("""
        with Pool(2) as mine:
            check(mine.map(sq, range(500), inline=False), 500)
            check(pmaprt.pmap(sq, range(500), inline=False), 500)
            parent = set(pmaprt.default_pool().pids()) | set(mine.pids())

            def child():
                for _ in range(3):
                    check(pmaprt.pmap(sq, range(2000), inline=False), 2000)
                check(pmaprt.pmap(sq, iter(range(300)), inline=False), 300)
                assert not set(pmaprt.default_pool().pids()) & parent
                with Pool(2) as p:
                    check(p.map(sq, range(100), inline=False), 100)

            fork(child)
            for _ in range(3):
                check(mine.map(sq, range(2000), inline=False), 2000)
                check(pmaprt.pmap(sq, range(2000), inline=False), 2000)
                assert mine.apply(sq, 7) == 49
            assert set(pmaprt.default_pool().pids()) | set(mine.pids()) == parent
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_the_parents_pool_in_a_child_is_a_clear_error():
    out = run("""
        with Pool(2) as mine:
            check(mine.map(sq, range(100), inline=False), 100)
            pids = mine.pids()

            def child():
                for call in (lambda: list(mine.map(sq, range(10), inline=False)),
                             lambda: mine.apply(sq, 3)):
                    try:
                        call()
                    except PoolClosedError as e:
                        assert "fork" in str(e) and str(os.getppid()) in str(e), e
                    else:
                        raise AssertionError("the parent's pool ran a map in the child")
                mine.terminate()            # lets go of nothing of the parent's
                mine.close()

            fork(child)
            check(mine.map(sq, range(3000), inline=False), 3000)
            assert mine.pids() == pids
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_fork_while_another_thread_maps():
    out = run("""
        check(pmaprt.pmap(sq, range(100), inline=False), 100)
        results = {}

        def mapper():
            results["t"] = list(pmaprt.pmap(slow, range(3000), inline=False))

        t = threading.Thread(target=mapper)
        t.start()
        time.sleep(0.2)

        def child():
            check(pmaprt.pmap(sq, range(1000), inline=False), 1000)

        for _ in range(3):
            fork(child)
            time.sleep(0.05)
        t.join(100)
        assert not t.is_alive(), "the parent's map hung"
        assert results["t"] == [x * x for x in range(3000)]
        check(pmaprt.pmap(sq, range(1000), inline=False), 1000)
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_a_child_holding_a_live_iterator_of_the_parent():
    out = run("""
        with Pool(2) as mine:
            it = mine.map(sq, range(20000), inline=False, chunksize=16)
            head = [next(it) for _ in range(100)]

            def child():
                global it
                del it              # finalized here: must not retire the parent's job

            fork(child)
            rest = list(it)
            assert head + rest == [x * x for x in range(20000)]
        print("ok")
    """)
    assert out.split() == ["ok"]
